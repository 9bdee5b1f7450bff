"""Vision encoder: a transformers SigLIP tower, run only up to LLaVA's feature layer."""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Patch features of image crops.

    LLaVA-OneVision reads ``hidden_states[vision_feature_layer]`` of SigLIP (before its post-layernorm), with
    the 'full' strategy (no CLS to drop). We stop at that layer instead of running the whole tower and the
    unused pooling head, which is the same result at less cost.
    """

    def __init__(self, tower: nn.Module, feature_layer: int = -1) -> None:
        super().__init__()
        self.tower = tower
        cfg = tower.config
        n = cfg.num_hidden_layers
        self.num_used_layers = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
        if not 0 <= self.num_used_layers <= n:
            raise ValueError(f"vision feature_layer={feature_layer} is out of range for a {n}-layer tower")
        self.image_size = cfg.image_size
        self.num_channels = cfg.num_channels
        self.patch_size = cfg.patch_size
        self.hidden_size = cfg.hidden_size

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError naming ``pixel_values`` when the crops do not fit the tower."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [crops, channels, height, width], got shape {tuple(pixel_values.shape)}")
        c, h, w = pixel_values.shape[1:]
        if c != self.num_channels:
            raise ValueError(f"pixel_values has {c} channels, the vision encoder expects {self.num_channels} (RGB)")
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values crops are {h}x{w}, the vision encoder expects {self.image_size}x{self.image_size}: "
                "resize/tile images with the model's image processor"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[crops, C, H, W] -> [crops, tokens_per_crop, vision_hidden]."""
        self.check_pixels(pixel_values)
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        hidden = self.tower.embeddings(pixel_values.to(dtype))
        for layer in self.tower.encoder.layers[: self.num_used_layers]:
            hidden = layer(hidden, attention_mask=None)
        return hidden
