"""Samples encoded once: a shard's encoded samples (token ids, labels, prompt, pixel tiles) saved beside it.

The chat template, tokenizer and AnyRes image processor cost about an eighth of a training step of the demo's tiny
model, and every stage, validation and evaluation re-reads the same shards. With
``data.encode_cache`` a shard that was read to its end, with every sample valid and encoded, is written to
``<shard dir>/.encoded/<fingerprint>/<shard>.pt``; later reads of that shard (by any stage, rank or worker) load it
instead of decoding and encoding again.

What makes the files safe to reuse:

* the fingerprint covers everything the encoding depends on: the tokenizer (its vocabulary, merges, special
  tokens and chat template), the visual-token count rule of the backbone (crop size, patch size, pinpoints,
  pooling, image token id), the image processor's settings, ``max_length``, ``max_pixels`` and
  :data:`FORMAT`; each file also records its shard's size and modification time, so a rebuilt shard is read
  afresh;
* a shard with any skipped or converted sample is not cached: it is read as before, so its counts stay exact;
* files are written to a temporary name and renamed (ranks that encode the same shard do not see half a file);
  one that cannot be loaded is read afresh and replaced.

Pixels are stored exactly: as one byte per value plus a palette when a shard holds at most 256 distinct values
(SigLIP's normalisation of 8-bit images gives 256), else as float32. Each sample costs its pixels: about 6 KB
for the demo's 32-px scenes, but 4-18 MB for a 0.5B LLaVA-OV AnyRes sample (10 crops of 384 px), which is why
the cache is off by default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .collate import Encoded

FORMAT = 1  # bump when Encoder's output or this file's layout changes: old files are then never read
CACHE_DIR = ".encoded"


def encoder_fingerprint(encoder: Any, max_pixels: int) -> str:
    """A short hash of everything an :class:`~data.collate.Encoder`'s output depends on."""
    tok, spec, proc = encoder.tok, encoder.spec, encoder.proc
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    parts = {
        "format": FORMAT,
        "tokenizer": [type(tok).__name__, hashlib.sha256(vocab.encode()).hexdigest(), tok.chat_template,
                      sorted(map(str, tok.all_special_tokens)), tok.pad_token_id],
        "visual": [spec.image_token_id, spec.vision.image_size, spec.vision.patch_size, spec.pinpoints(),
                   list(spec.pool_shape) if spec.pool_shape is not None else None, spec.vision_aspect_ratio],
        "processor": [type(proc).__name__, proc.to_dict() if hasattr(proc, "to_dict") else repr(proc)],
        "max_length": encoder.max_length,
        "max_pixels": max_pixels,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class EncodeCache:
    """Where a shard's encoded samples live (picklable: DataLoader workers get a copy)."""

    fingerprint: str
    root: str | None = None  # None: beside each shard; else one directory for all (names keep the shard's folder)

    def path_for(self, url: str) -> Path | None:
        """The cache file of a local shard; None for ``pipe:``/remote URLs (not cached)."""
        if "://" in url or url.startswith("pipe:"):
            return None
        shard = Path(url)
        if self.root is None:
            return shard.parent / CACHE_DIR / self.fingerprint / (shard.name + ".pt")
        folder = hashlib.sha256(str(shard.resolve().parent).encode()).hexdigest()[:8]
        return Path(self.root) / self.fingerprint / f"{folder}-{shard.name}.pt"

    def load(self, url: str) -> list[Encoded] | None:
        """The shard's encoded samples, or None when there is no usable file (missing, stale or unreadable)."""
        path = self.path_for(url)
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=True)
            if blob["format"] != FORMAT or blob["shard"] != _shard_id(Path(url)):
                return None
            return _unpack(blob)
        except Exception as e:  # a half-written or foreign file: read the shard again (and replace the file)
            warnings.warn(f"{path}: unreadable encoded-sample cache ({type(e).__name__}: {e}); reading {url} again")
            return None

    def save(self, url: str, samples: list[Encoded]) -> None:
        """Write atomically; a directory that cannot be written only loses the speed-up (said once per shard)."""
        path = self.path_for(url)
        if path is None or not samples:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(_pack(samples, _shard_id(Path(url))), tmp)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"{path}: cannot write the encoded-sample cache ({e}); {url} will be encoded on every read")


def _pack(samples: list[Encoded], shard: list[int]) -> dict[str, Any]:
    """One flat tensor per field plus lengths (a pickle of 400 samples' own tensors loads 10x slower)."""
    blob: dict[str, Any] = {"format": FORMAT, "shard": shard, "n": len(samples)}
    for name in ("input_ids", "labels", "prompt_ids"):
        parts = [getattr(s, name) for s in samples]
        blob[name] = torch.cat(parts)
        blob[name + "_len"] = torch.tensor([len(p) for p in parts])
    blob["image_size"] = torch.stack([s.image_size for s in samples])
    blob["meta"] = json.dumps([s.meta for s in samples])
    blob["pixel_shapes"] = torch.tensor([list(s.pixel_values.shape) for s in samples])
    pixels = torch.cat([s.pixel_values.reshape(-1) for s in samples])
    palette, codes = torch.unique(pixels, return_inverse=True)
    if len(palette) <= 256:  # exact: palette[codes] gives back every value
        blob["palette"], blob["codes"] = palette, codes.to(torch.uint8)
    else:
        blob["pixels"] = pixels
    return blob


def _unpack(blob: dict[str, Any]) -> list[Encoded]:
    n = blob["n"]
    fields = {name: torch.split(blob[name], blob[name + "_len"].tolist()) for name in ("input_ids", "labels", "prompt_ids")}
    flat = blob["palette"][blob["codes"].long()] if "codes" in blob else blob["pixels"]
    shapes = [tuple(s) for s in blob["pixel_shapes"].tolist()]
    pixels = [p.view(shape) for p, shape in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)]
    meta = json.loads(blob["meta"])
    if not (len(pixels) == len(meta) == len(fields["input_ids"]) == n):
        raise ValueError(f"sample counts disagree ({n} recorded)")
    return [Encoded(input_ids=fields["input_ids"][i], labels=fields["labels"][i], prompt_ids=fields["prompt_ids"][i],
                    pixel_values=pixels[i], image_size=blob["image_size"][i], meta=meta[i]) for i in range(n)]


__all__ = ["CACHE_DIR", "EncodeCache", "FORMAT", "encoder_fingerprint"]
