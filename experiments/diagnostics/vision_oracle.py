"""`visor` with a vision oracle: is the demo base's vision path what keeps it from reading a named grid cell?

Runs any `visor` command (typically `fit --config experiments/debug/stage0_base.yaml ...`) with the SigLIP tower
replaced by the cleanest visual tokens there can be: each 8-px patch is classified by the colour of its centre pixel
(the scenes' palette or background; anything else gets its own id) and looked up in a learned table of vectors at
the patch embeddings' scale. LLaVA-OV's projector, AnyRes packing and the language model are untouched. If the base
still stays at the position-free level with these tokens (docs/science.md section 8), the obstacle is on the
language side, not in the pixels.

Diagnostic only (a monkeypatch; nothing in visor_lightning imports it). Usage:
    HF_HUB_OFFLINE=1 python experiments/diagnostics/vision_oracle.py fit --config experiments/debug/stage0_base.yaml \
        --mlflow false --trainer.default_root_dir /tmp/oracle
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from visor_lightning.data.scenes import BACKGROUND, PALETTE
from visor_lightning.models import vision

COLOURS = torch.tensor([BACKGROUND, *PALETTE.values()]).float() / 127.5 - 1  # SigLIP-normalised, [7, 3]
OTHER = len(COLOURS)  # id of a centre pixel that is none of them (shape edges, easy-vqa images)
_encoder_init = vision.VisionEncoder.__init__


def oracle_ids(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[crops, 3, H, W] normalised pixels -> [crops, (H/patch) * (W/patch)] colour ids of the patch centres."""
    centre = pixel_values[:, :, patch // 2::patch, patch // 2::patch].permute(0, 2, 3, 1)  # [crops, g, g, 3]
    dist = torch.cdist(centre.reshape(-1, 3).float(), COLOURS.to(centre.device))
    ids = torch.where(dist.min(1).values > 0.3, OTHER, dist.argmin(1))
    return ids.view(pixel_values.shape[0], -1)


def _init(self: vision.VisionEncoder, tower: nn.Module, feature_layer: int = -1) -> None:
    _encoder_init(self, tower, feature_layer)
    self.oracle = nn.Embedding(OTHER + 1, self.hidden_size)
    with torch.no_grad():  # unit scale, as the SigLIP patch embeddings of these scenes (std ~1 at init)
        self.oracle.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))


def _forward(self: vision.VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    self.check_pixels(pixel_values)
    return self.oracle(oracle_ids(pixel_values, self.patch_size))


def install() -> None:
    vision.VisionEncoder.__init__ = _init
    vision.VisionEncoder.forward = _forward


if __name__ == "__main__":
    install()
    print("vision oracle: every patch -> the learned vector of its centre pixel's colour", flush=True)
    from visor_lightning.cli import main

    sys.argv[0] = "visor"
    sys.exit(main())
