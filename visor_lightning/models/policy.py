"""The policy (router): a small MLP that picks one feasible configuration per sample.

It runs in front of the first optional SA layer, on mean-pooled text hidden states (which already read the image
through earlier CA layers) and mean-pooled visual tokens. The output is a classification over the schedule's
feasible configurations, not per-layer gates (method note, section 3.4).
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, N, d] averaged over positions where ``valid`` [B, N] is True (zeros if none)."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class Policy(nn.Module):
    def __init__(self, hidden_size: int, num_configs: int, width: int = 256) -> None:
        super().__init__()
        self.num_configs = num_configs
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.GELU(), nn.Linear(width, num_configs))

    def forward(self, text: torch.Tensor, text_valid: torch.Tensor, visual: torch.Tensor, visual_valid: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_configs] over feasible configurations."""
        pooled = torch.cat([masked_mean(text, text_valid), masked_mean(visual, visual_valid)], dim=-1)
        return self.mlp(self.norm(pooled.to(self.norm.weight.dtype)))
