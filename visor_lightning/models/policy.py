"""The policy (router): a small MLP that picks one feasible configuration per sample.

It runs in front of the first optional SA layer, on mean-pooled text hidden states (which already read the image
through earlier CA layers) and mean-pooled visual tokens, each half layer-normalised on its own (``StreamNorm``).
Its head is one of two kinds (``Policy.head``):

* ``choice``: a classifier over the schedule's feasible configurations (method note, section 3.4); the argmax
  runs. The paper's pseudo-label objective and the compute-budget objective train this kind.
* ``correctness``: one logit per configuration, the predicted probability that this configuration answers the
  sample correctly. At inference one knob, ``max_acc_drop``, picks the cheapest configuration whose predicted
  correctness is at most ``max_acc_drop`` below the maximal configuration's (0: give up nothing that the router
  can see; 1: always the cheapest). One trained router serves every budget without retraining.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

HEADS = ("choice", "correctness")
KNOB = "max_acc_drop"
_KNOB_TARGET = re.compile(r"^policy\(max_acc_drop=([0-9.eE+-]+)\)$")


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, N, d] averaged over positions where ``valid`` [B, N] is True (zeros if none)."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def check_knob(max_acc_drop: float) -> float:
    """``max_acc_drop`` is a drop in predicted accuracy (a probability): it must lie in [0, 1]."""
    v = float(max_acc_drop)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{KNOB} must be in [0, 1] (0.05 = give up at most 5 points of predicted accuracy), got {max_acc_drop}")
    return v


def knob_target(max_acc_drop: float) -> str:
    """The evaluation-target name of the router at one knob value: ``policy(max_acc_drop=0.05)``."""
    return f"policy({KNOB}={check_knob(max_acc_drop):g})"


def parse_knob_target(name: str) -> float | None:
    """``policy(max_acc_drop=0.05)`` -> 0.05; any other name -> None (a malformed knob value raises)."""
    m = _KNOB_TARGET.match(name.replace(" ", ""))
    if m is None:
        if name.replace(" ", "").startswith("policy("):
            raise ValueError(f"{name!r}: the router's target is written policy({KNOB}=X) with X in [0, 1]")
        return None
    return check_knob(float(m.group(1)))


def choose_by_correctness(logits: torch.Tensor, sa_counts: Sequence[int], full: int, max_acc_drop: float) -> torch.Tensor:
    """Per row of correctness logits [B, K]: the cheapest configuration (fewest SA layers: every SA layer costs the
    same, so this is the FLOPs order for any sample) whose predicted correctness is >= the maximal configuration's
    minus ``max_acc_drop``; among equally cheap ones the most likely to be right. The maximal one always qualifies."""
    drop = check_knob(max_acc_drop)
    p = logits.float().sigmoid()
    ok = p >= p[:, full : full + 1] - drop
    cost = torch.tensor(list(sa_counts), dtype=p.dtype, device=p.device)
    key = 2.0 * cost[None] - p  # cost steps are 2 apart, p spans at most 1: cost first, then correctness
    return torch.where(ok, key, torch.full_like(key, float("inf"))).argmin(-1)


def correctness_loss(logits: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """The router's objective: binary cross-entropy of each configuration's logit [B, K] against how much of the
    sample that configuration gets right [B, K] (answer-token accuracy in [0, 1])."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), correct.float())


class StreamNorm(nn.Module):
    """LayerNorm of the pooled [text; visual] input with each half normalised on its own (one affine over both).

    Before the first layers have mixed them, mean-pooled visual features are about 100x the norm of mean-pooled
    text embeddings (the demo: 22.6 against 0.24), so one LayerNorm over the concatenation all but erases the
    question; the router then cannot tell "How many ...?" from "What colour ...?" (docs/science.md section 11).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(2 * hidden_size))
        self.bias = nn.Parameter(torch.zeros(2 * hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.hidden_size
        halves = [nn.functional.layer_norm(x[..., i * d : (i + 1) * d], (d,), self.weight[i * d : (i + 1) * d],
                                           self.bias[i * d : (i + 1) * d], self.eps) for i in (0, 1)]
        return torch.cat(halves, dim=-1)


class Policy(nn.Module):
    def __init__(self, hidden_size: int, num_configs: int, width: int = 256, head: str = "choice") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"policy head must be one of {HEADS}, got {head!r}")
        self.num_configs = num_configs
        self.head = head  # what the logits mean (saved in visor.json as policy_head)
        self.trained = False  # has a policy stage trained it (visor.json's policy_trained): evaluation skips it if not
        self.norm = StreamNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.GELU(), nn.Linear(width, num_configs))

    def forward(self, text: torch.Tensor, text_valid: torch.Tensor, visual: torch.Tensor, visual_valid: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_configs] over feasible configurations."""
        pooled = torch.cat([masked_mean(text, text_valid), masked_mean(visual, visual_valid)], dim=-1)
        return self.mlp(self.norm(pooled.to(self.norm.weight.dtype)))

    def knob(self, max_acc_drop: float | None) -> float | None:
        """The knob value this head runs at (a correctness head defaults to 0); a classifier takes none."""
        if self.head == "correctness":
            return 0.0 if max_acc_drop is None else check_knob(max_acc_drop)
        if max_acc_drop is not None:
            raise ValueError(f"{KNOB} needs a router trained with objective: correctness; this policy is a classifier "
                             "(objective pseudo_label or budget), which always runs its argmax")
        return None

    def route(self, logits: torch.Tensor, sa_counts: Sequence[int], full: int, max_acc_drop: float | None = None) -> torch.Tensor:
        """Configuration ids [B]: argmax for a ``choice`` head; the knob rule for a ``correctness`` head."""
        knob = self.knob(max_acc_drop)
        return logits.argmax(-1) if knob is None else choose_by_correctness(logits, sa_counts, full, knob)

    def predicted_correctness(self, logits: torch.Tensor) -> torch.Tensor | None:
        """P(correct) per configuration [B, K] for a ``correctness`` head, else None (a classifier predicts none)."""
        return logits.float().sigmoid() if self.head == "correctness" else None
