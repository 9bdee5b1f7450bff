"""Answer scoring: VQA-style normalisation and an exact-match torchmetrics Metric (summed over ranks)."""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
            "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, number words -> digits (the VQA evaluation convention)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


class ExactMatch(Metric):
    """Fraction of predictions equal to the reference after :func:`normalize_answer`."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:  # type: ignore[override]
        hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        self.correct += hits
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp_min(1.0)


def metric_key(name: str) -> str:
    """A configuration name as an MLflow-safe metric key: ``sa[0,3]`` -> ``sa_0_3``."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]+", "_", name).strip("_").replace("__", "_")


class ChoiceCounts(Metric):
    """How often the policy chose each configuration (a count vector, summed over ranks)."""

    full_state_update = False

    def __init__(self, num_configs: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(num_configs, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, chosen: torch.Tensor) -> None:  # type: ignore[override]
        self.counts += torch.bincount(chosen.flatten().long(), minlength=len(self.counts)).to(self.counts)

    def compute(self) -> torch.Tensor:
        return self.counts
