"""Backbone shapes as plain dataclasses, so YAML configs (and the FLOPs model) need no weights on disk.

A :class:`BackboneSpec` turns into a transformers ``LlavaOnevisionConfig`` (for random or meta init) and can be
read back from a checkpoint's ``config.json``; ``pretrained`` points at a local LLaVA-OneVision directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TextSpec:
    """Host LLM (Qwen2) shapes."""

    hidden_size: int = 896  # d, the residual width
    num_layers: int = 24  # L decoder layers; the schedule gives each one a role
    num_heads: int = 14  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA); CA blocks use the same
    intermediate_size: int = 4864  # SwiGLU width m
    vocab_size: int = 151936  # embedding rows (a from-scratch base is sized to its tokenizer)
    rope_theta: float = 1_000_000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    max_position_embeddings: int = 32768  # longest sequence the RoPE cache is built for
    tie_word_embeddings: bool = True  # LM head shares the embedding matrix
    # Qwen2's 0.02 suits width 896; a narrow from-scratch base learns far slower with it (docs/science.md 6)
    initializer_range: float = 0.02  # std of the from-scratch init of LLM and projector weights (loading ignores it)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VisionSpec:
    """Vision tower (SigLIP) shapes; ``feature_layer`` is LLaVA's ``vision_feature_layer``."""

    hidden_size: int = 1152  # SigLIP width
    num_layers: int = 26  # SigLIP encoder layers
    num_heads: int = 16  # SigLIP attention heads
    intermediate_size: int = 4304  # SigLIP MLP width
    image_size: int = 384  # crop side in pixels (AnyRes tiles and the base crop)
    patch_size: int = 14  # patch side; (image_size / patch_size)^2 tokens per crop
    num_channels: int = 3  # input channels
    feature_layer: int = -1  # the hidden state LLaVA takes (-1: the last layer)

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class BackboneSpec:
    """A LLaVA-OneVision-shaped backbone. Defaults are LLaVA-OV 0.5B (Qwen2-0.5B + SigLIP-400M/14 @ 384)."""

    text: TextSpec = field(default_factory=TextSpec)  # the host LLM, see backbone.text
    vision: VisionSpec = field(default_factory=VisionSpec)  # the vision tower, see backbone.vision
    image_grid_pinpoints: list[list[int]] | None = None  # None: LLaVA-OV's 1x1..6x6 grid of 384 crops
    vision_aspect_ratio: str = "anyres_max_9"  # tile grids above N tiles are shrunk (LLaVA-OV's anyres_max_9)
    image_token_id: int = 151646  # the <image> placeholder id the collator expands
    pretrained: str | None = None  # a local LlavaOnevisionForConditionalGeneration.save_pretrained directory
    token_pool: int = 1  # VISOR-TR: average-pool the visual grid by this token factor (1 off, 2 = 1x2, 4 = 2x2)

    @property
    def pool_shape(self) -> tuple[int, int]:
        """(rows, cols) window of VISOR-TR's average pooling over each visual-token grid."""
        shapes = {1: (1, 1), 2: (1, 2), 4: (2, 2), 9: (3, 3), 16: (4, 4)}
        if self.token_pool not in shapes:
            raise ValueError(f"backbone.token_pool must be one of {sorted(shapes)} (token reduction factor), got {self.token_pool}")
        return shapes[self.token_pool]

    def pinpoints(self) -> list[list[int]]:
        if self.image_grid_pinpoints is not None:
            return [list(p) for p in self.image_grid_pinpoints]
        s = self.vision.image_size
        return [[s * i, s * j] for i in range(1, 7) for j in range(1, 7)]

    def visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens LLaVA-OV's AnyRes packing makes for one image of this original (height, width).

        Base crop (g*g) + the tile grid unpadded to the image's aspect ratio, shrunk when above ``anyres_max_N``
        tiles, with one newline token per row. The collator expands ``<image>`` to this many tokens; a test
        checks it against the connector's actual output.
        """
        from transformers.image_processing_utils import select_best_resolution

        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        s = self.vision.image_size
        g = s // self.vision.patch_size
        best_h, best_w = select_best_resolution((height, width), self.pinpoints())
        rows, cols = (best_h // s) * g, (best_w // s) * g
        if width / height > cols / rows:
            new_h = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - new_h) // 2)
        else:
            new_w = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - new_w) // 2)
        return self.packed_tokens(rows, cols)

    def vision_crops(self, height: int, width: int) -> int:
        """Crops SigLIP encodes for one image: the base crop plus the AnyRes tile grid it is resized to."""
        from transformers.image_processing_utils import select_best_resolution

        s = self.vision.image_size
        best_h, best_w = select_best_resolution((height, width), self.pinpoints())
        return 1 + (best_h // s) * (best_w // s)

    def packed_tokens(self, rows: int, cols: int) -> int:
        """Tokens of a (rows x cols) unpadded tile-feature grid after AnyRes packing: shrunk when above
        ``anyres_max_N`` tiles, one newline per row, plus the base crop's g*g; with VISOR-TR, both grids are
        pooled by ``pool_shape`` (windows cut at the edge, so a side of n becomes ceil(n / window))."""
        g = self.vision.image_size // self.vision.patch_size
        max_tiles = int(self.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * g * g))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        ph, pw = self.pool_shape
        up = lambda n, k: -(-n // k)  # noqa: E731
        return up(g, ph) * up(g, pw) + up(rows, ph) * (up(cols, pw) + 1)

    def to_hf_config(self) -> Any:
        from transformers import LlavaOnevisionConfig

        t, v = self.text, self.vision
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            raise ValueError(
                f"backbone.text: hidden_size {t.hidden_size} must divide by num_heads {t.num_heads}, "
                f"and num_heads by num_kv_heads {t.num_kv_heads}"
            )
        if self.image_token_id >= t.vocab_size:
            raise ValueError(f"backbone.image_token_id {self.image_token_id} >= text.vocab_size {t.vocab_size}")
        text_config = dict(
            model_type="qwen2",
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            intermediate_size=t.intermediate_size,
            vocab_size=t.vocab_size,
            rope_theta=t.rope_theta,
            rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
            initializer_range=t.initializer_range,
        )
        vision_config = dict(
            model_type="siglip_vision_model",
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            intermediate_size=v.intermediate_size,
            image_size=v.image_size,
            patch_size=v.patch_size,
            num_channels=v.num_channels,
            vision_use_head=False,
        )
        cfg = LlavaOnevisionConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_index=self.image_token_id,
            image_grid_pinpoints=self.pinpoints(),
            vision_feature_layer=v.feature_layer,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=self.vision_aspect_ratio,
            tie_word_embeddings=t.tie_word_embeddings,
        )
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: Any, pretrained: str | None = None) -> "BackboneSpec":
        t, v = cfg.text_config, cfg.vision_config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        if getattr(cfg, "vision_feature_select_strategy", "full") != "full":
            raise ValueError("vision_feature_select_strategy must be 'full' (LLaVA-OneVision's setting)")
        return cls(
            text=TextSpec(
                hidden_size=t.hidden_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                num_kv_heads=t.num_key_value_heads,
                intermediate_size=t.intermediate_size,
                vocab_size=t.vocab_size,
                rope_theta=float(getattr(t, "rope_theta", None) or (t.rope_parameters or {}).get("rope_theta", 1e6)),
                rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings,
                tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False) or t.tie_word_embeddings),
                initializer_range=float(getattr(t, "initializer_range", TextSpec.initializer_range)),
            ),
            vision=VisionSpec(
                hidden_size=v.hidden_size,
                num_layers=v.num_hidden_layers,
                num_heads=v.num_attention_heads,
                intermediate_size=v.intermediate_size,
                image_size=v.image_size,
                patch_size=v.patch_size,
                num_channels=v.num_channels,
                feature_layer=layer,
            ),
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            image_token_id=cfg.image_token_id,
            pretrained=pretrained,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "BackboneSpec":
        """Read only ``config.json`` of a local LLaVA-OneVision directory (no weights touched)."""
        from transformers import LlavaOnevisionConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone.pretrained={str(path)!r} has no config.json: point it at a directory written by "
                "LlavaOnevisionForConditionalGeneration.save_pretrained (e.g. a downloaded llava-onevision-qwen2-0.5b-ov-hf)"
            )
        return cls.from_hf_config(LlavaOnevisionConfig.from_pretrained(str(path)), pretrained=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        """Inverse of :meth:`to_dict`; missing ``text``/``vision`` fields take their defaults."""
        d = dict(d)
        return cls(**{**d, "text": TextSpec(**(d.get("text") or {})), "vision": VisionSpec(**(d.get("vision") or {}))})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def tiny_backbone(vocab_size: int = 256, num_layers: int = 6, image_token_id: int | None = None) -> BackboneSpec:
    """A few-hundred-k-parameter LLaVA-OV-shaped backbone for tests and the CPU demo (GQA kept).

    ``image_token_id`` defaults to the last id; pass a trained tokenizer's ``<image>`` id to match it."""
    return BackboneSpec(
        text=TextSpec(
            hidden_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, intermediate_size=128,
            vocab_size=vocab_size, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
        ),
        vision=VisionSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32, patch_size=8),
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
    )
