"""What a sample is, what can be wrong with one, and how skipped samples are counted.

A shard sample is ``<key>.json`` (LLaVA conversation format plus ``source``/``subset``) and ``<key>.jpg|png``.
Every way a sample can be bad has a fixed *reason* name; lenient reading skips and counts per reason, strict
reading raises :class:`DataError` naming the file (or shard) and the key.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Reasons a sample (or a whole shard) is skipped. The order is fixed: it indexes the shared counters.
REASONS = (
    "corrupt_image",  # image bytes PIL cannot decode
    "missing_image",  # no image file / no image member for the key
    "image_too_large",  # more pixels than max_pixels (decompression-bomb guard)
    "malformed_json",  # the sample's JSON does not parse or is not an object
    "missing_conversations",  # no (or an empty) 'conversations' list
    "bad_conversation",  # turns that are not {from: human|gpt, value: str}, or no human turn before a gpt turn
    "empty_answer",  # a gpt turn with an empty value
    "placeholder_mismatch",  # more than one <image> placeholder for the one image
    "multi_image",  # LLaVA records with a list of images (not supported yet)
    "no_image",  # text-only LLaVA records (this pipeline streams image-text pairs)
    "too_long",  # longer than max_length tokens after the image placeholder is expanded
    "truncated_shard",  # a tar that ends mid-member: the rest of that shard is unreadable
    "unreadable_shard",  # a shard that cannot be opened or is not a tar
)
# Not skips: images that were fixed on the way (counted so the manifest says what happened).
CONVERSIONS = ("converted_grayscale", "converted_rgba", "converted_palette", "converted_other")


class DataError(ValueError):
    """A bad sample or shard under ``strict=True``; the message names the file and the key."""


@dataclass
class Conversation:
    """A validated LLaVA-style record: ``turns`` alternate human/gpt and contain exactly one ``<image>``."""

    id: str
    turns: list[tuple[str, str]]  # (role "human"|"gpt", text)
    source: str
    subset: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The last gpt turn (what evaluation asks for)."""
        return next(text for role, text in reversed(self.turns) if role == "gpt")

    @property
    def question(self) -> str:
        """The last human turn without the image placeholder: what the question-only baseline keys on."""
        text = next(text for role, text in reversed(self.turns) if role == "human")
        return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())

    @property
    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages (human -> user, gpt -> assistant)."""
        return [{"role": "user" if r == "human" else "assistant", "content": t} for r, t in self.turns]

    def to_json(self) -> dict[str, Any]:
        conv = [{"from": r, "value": t} for r, t in self.turns]
        return {"id": self.id, "conversations": conv, "source": self.source, "subset": self.subset, **self.extra}


class BadSample(Exception):
    """Raised inside the pipeline with a reason from :data:`REASONS`; turned into a count or a DataError."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


IMAGE_PLACEHOLDER = "<image>"


def parse_record(obj: Any, *, default_source: str = "", default_subset: str = "") -> Conversation:
    """Validate one LLaVA record (already parsed JSON). Raises :class:`BadSample` with the reason."""
    if not isinstance(obj, dict):
        raise BadSample("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("missing_conversations", "no 'conversations' list (or it is empty)")
    turns: list[tuple[str, str]] = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise BadSample("bad_conversation", f"conversations[{i}] must be {{from: human|gpt, value: str}}, got {t!r:.80}")
        turns.append((t["from"], t["value"]))
    if turns[0][0] != "human" or any(a[0] == b[0] for a, b in zip(turns, turns[1:])):
        raise BadSample("bad_conversation", "turns must alternate human, gpt, human, ... starting with human")
    if not any(r == "gpt" for r, _ in turns):
        raise BadSample("bad_conversation", "no gpt turn: nothing to learn or to evaluate")
    for i, (r, t) in enumerate(turns):
        if r == "gpt" and not t.strip():
            raise BadSample("empty_answer", f"conversations[{i}] (gpt) is empty")
    n_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns)
    if n_placeholders > 1:
        raise BadSample("placeholder_mismatch", f"{n_placeholders} '<image>' placeholders for one image")
    if n_placeholders == 0:  # LLaVA convention: the image comes first in the first human turn
        turns[0] = ("human", f"{IMAGE_PLACEHOLDER}\n{turns[0][1]}")
    known = {"id", "conversations", "source", "subset", "image"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Conversation(
        id=str(obj.get("id", "")),
        turns=turns,
        source=str(obj.get("source") or default_source),
        subset=str(obj.get("subset") or default_subset),
        extra=extra,
    )


def parse_json_bytes(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("malformed_json", str(e)) from None


class SkipStats:
    """Per-reason counters that work across DataLoader worker processes.

    Each worker owns one row of a shared-memory tensor (no lost updates between workers); the main process
    reads the sum at any time, including after workers have exited. ``strict=True`` raises instead of counting.
    """

    NAMES = REASONS + CONVERSIONS + ("read",)  # "read": valid samples delivered

    def __init__(self, strict: bool = False, max_workers: int = 64) -> None:
        self.strict = strict
        self.table = torch.zeros(max_workers + 1, len(self.NAMES), dtype=torch.int64).share_memory_()

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id
        if row >= self.table.shape[0]:
            raise RuntimeError(f"SkipStats was sized for {self.table.shape[0] - 1} workers; DataLoader worker {row - 1} has no row")
        return row

    def add(self, name: str, n: int = 1) -> None:
        self.table[self._row(), self.NAMES.index(name)] += n

    def skip(self, bad: BadSample, where: str, key: str | None = None) -> None:
        """Count ``bad`` or, when strict, raise a DataError naming ``where`` (file or shard) and ``key``."""
        if self.strict:
            at = f"{where}" + (f" key {key!r}" if key is not None else "")
            raise DataError(f"{at}: {bad.reason}: {bad.detail} (strict=True; pass strict=False to skip and count)")
        self.add(bad.reason)

    def mark(self) -> torch.Tensor:
        """This process's (or worker's) counters now, for :meth:`only_read_since`."""
        return self.table[self._row()].clone()

    def only_read_since(self, mark: torch.Tensor) -> bool:
        """Whether nothing but valid reads was counted here since ``mark`` (no skip, no conversion)."""
        diff = self.table[self._row()] - mark
        diff[self.NAMES.index("read")] = 0
        return not bool(diff.any())

    def counts(self) -> dict[str, int]:
        total = self.table.sum(0).tolist()
        return {n: int(c) for n, c in zip(self.NAMES, total) if c}

    def skipped(self) -> dict[str, int]:
        return {k: v for k, v in self.counts().items() if k in REASONS}

    @property
    def read(self) -> int:
        return int(self.table[:, self.NAMES.index("read")].sum())

    def reset(self) -> None:
        self.table.zero_()


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))
