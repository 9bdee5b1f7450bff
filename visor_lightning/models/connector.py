"""Connector: LLaVA-OV's 2-layer MLP projector, its AnyRes packing, VISOR's conditional positional embedding, and
VISOR-TR's optional average pooling of the visual grids (fewer visual tokens for every CA/SA layer)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


class ConditionalPositionalEmbedding(nn.Module):
    """Depthwise 1-D convolution (kernel 7, padding 3) added to the visual tokens, zero-initialised.

    Zero init keeps the connector exactly LLaVA-OV's at the start of training; CA blocks use no RoPE, so this is
    where visual tokens get their positions from.
    """

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-image token sequences [n_i, d] -> same shapes; right zero-padding equals the conv's own padding."""
        lengths = [t.shape[0] for t in tokens]
        batch = pad_sequence(tokens, batch_first=True)  # [B, n_max, d]
        out = batch + self.conv(batch.transpose(1, 2)).transpose(1, 2)
        return [out[i, :n] for i, n in enumerate(lengths)]


class Connector(nn.Module):
    """Vision features -> LLM-width visual tokens, one sequence per image.

    ``projector`` and ``image_newline`` are LLaVA-OV's own modules (their checkpoint keys load unchanged);
    packing reproduces LLaVA-OV's AnyRes layout: base crop tokens, then the unpadded tile grid with a newline
    token closing every row (a single crop gets one trailing newline).
    """

    def __init__(
        self,
        projector: nn.Module,
        image_newline: nn.Parameter,
        *,
        image_size: int,
        patch_size: int,
        grid_pinpoints: list[list[int]],
        vision_aspect_ratio: str = "anyres_max_9",
        pool: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.projector = projector
        self.image_newline = image_newline
        self.cpe = ConditionalPositionalEmbedding(image_newline.shape[0])
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.grid_pinpoints = [list(p) for p in grid_pinpoints]
        self.max_tiles = int(vision_aspect_ratio.removeprefix("anyres_max_"))
        self.pool = tuple(pool)  # VISOR-TR: average-pool window over the base grid and the tile grid

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[d, h, w] grid -> [d, ceil(h/ph), ceil(w/pw)]; edge windows average only the tokens they cover."""
        if self.pool == (1, 1):
            return x
        if x.shape[1] == 0 or x.shape[2] == 0:  # an extreme aspect ratio can unpad a grid to nothing
            return x.new_zeros(x.shape[0], -(-x.shape[1] // self.pool[0]), -(-x.shape[2] // self.pool[1]))
        return nn.functional.avg_pool2d(x[None], self.pool, self.pool, ceil_mode=True)[0]

    def _base(self, feats: torch.Tensor) -> torch.Tensor:
        """The base crop's [g*g, d] tokens, pooled (row-major, as LLaVA-OV orders them)."""
        if self.pool == (1, 1):
            return feats
        g = self.grid
        return self._pooled(feats.T.reshape(-1, g, g)).flatten(1).T

    def num_crops(self, image_size_hw: tuple[int, int]) -> int:
        """Crops the processor makes for an image of this (height, width): base + tiles of the best grid."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return image_size_to_num_patches(list(image_size_hw), self.grid_pinpoints, self.image_size)

    def _pack(self, feats: torch.Tensor, image_size_hw: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        newline = self.image_newline.to(feats.dtype)
        if feats.shape[0] == 1:
            return torch.cat([self._base(feats[0]), newline[None]], dim=0)
        base, tiles = feats[0], feats[1:]
        gh, gw = get_anyres_image_grid_shape(image_size_hw, self.grid_pinpoints, self.image_size)
        g = self.grid
        x = tiles.view(gh, gw, g, g, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        x = unpad_image(x, image_size_hw)
        c, h, w = x.shape
        ratio = math.sqrt(h * w / (self.max_tiles * g**2))
        if ratio > 1.1:
            x = nn.functional.interpolate(x[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
        x = self._pooled(x)
        x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
        return torch.cat([self._base(base), x.flatten(1, 2).transpose(0, 1)], dim=0)

    def forward(self, features: torch.Tensor, crops_per_image: list[int], image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
        """[total_crops, n, d_vision] -> list (one per image) of [n_i, d] visual tokens."""
        projected = self.projector(features)
        per_image = torch.split(projected, crops_per_image, dim=0)
        packed = [
            self._pack(f, image_sizes[i] if image_sizes is not None else None) for i, f in enumerate(per_image)
        ]
        return self.cpe(packed)
