"""Writing WebDataset shards: ``{split}-%06d.tar`` plus ``{split}-manifest.json`` (counts, skips, sha256).

Builder workers materialize items in parallel; the main process writes them in input order, so the shards (and
their sha256) are the same for any ``workers``. Counts always reconcile: written + skipped == input.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .images import DEFAULT_MAX_PIXELS
from .schema import BadSample, DataError
from .sources import Item, Materialized, materialize

MANIFEST_VERSION = 1
MAX_EXAMPLES = 20  # skipped samples listed by name in the manifest (all are counted)


def shard_pattern(split: str) -> str:
    return f"{split}-%06d.tar"


def manifest_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}-manifest.json"


def split_urls(out: str | Path, split: str) -> list[str]:
    """The shard files a manifest lists (in order), as paths; raises if the manifest is missing."""
    m = read_manifest(out, split)
    return [str(Path(out) / s["name"]) for s in m["shards"]]


def read_manifest(out: str | Path, split: str) -> dict[str, Any]:
    path = manifest_path(out, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the split first (visor data build --split {split} ...)")
    return json.loads(path.read_text())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(n: int, sample_id: str) -> str:
    """Tar member stem: unique (running number) and dot-free (WebDataset splits key/extension at the first dot)."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id)[:80]
    return f"{n:08d}-{safe}" if safe else f"{n:08d}"


def _work(args: tuple[Item, int]) -> tuple[Item, Materialized | BadSample]:
    item, max_pixels = args
    try:
        return item, materialize(item, max_pixels)
    except BadSample as bad:
        return item, bad


class _Writer:
    """Rotating ``TarWriter`` with fixed mtime (reproducible bytes); records name, count, sha256 per shard."""

    def __init__(self, out: Path, split: str, shard_size: int) -> None:
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self.tar = None
        self.count = 0  # samples in the open shard
        self.total = 0  # samples written so far

    def write(self, sample: dict[str, Any]) -> None:
        import webdataset as wds

        if self.tar is None:
            name = shard_pattern(self.split) % len(self.shards)
            self.tar = wds.TarWriter(str(self.out / name), mtime=0)
            self.shards.append({"name": name})
            self.count = 0
        self.tar.write(sample)
        self.count += 1
        self.total += 1
        if self.count >= self.shard_size:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        entry = self.shards[-1]
        path = self.out / entry["name"]
        entry.update(samples=self.count, bytes=path.stat().st_size, sha256=sha256_file(path))


def _prepare_out(out: Path, split: str, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob(f"{split}-*.tar")) + ([manifest_path(out, split)] if manifest_path(out, split).exists() else [])
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds split {split!r} ({len(old)} files); pass --overwrite to replace it")
    for p in old:
        p.unlink()


def build_shards(
    items: Iterable[Item],
    out: str | Path,
    split: str,
    *,
    total: int | None = None,
    shard_size: int = 1000,
    workers: int = 0,
    max_samples: int | None = None,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    progress: bool = True,
    builder_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one split and return its manifest (also saved as ``{split}-manifest.json``).

    Lenient (default): bad items are skipped and counted per reason (the first few listed by name). Strict: the
    first bad item raises a DataError naming the input file/record. ``max_samples`` caps the samples written.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r}: use letters, digits and underscores only (it names the shard files)")
    out = Path(out)
    _prepare_out(out, split, overwrite)
    t0 = time.perf_counter()
    writer = _Writer(out, split, shard_size)
    n_in, skipped, converted, subsets, sources = 0, Counter(), Counter(), Counter(), Counter()
    examples: list[dict[str, str]] = []
    pool = mp.get_context("fork").Pool(workers) if workers > 0 else None
    jobs = ((it, max_pixels) for it in items)
    results: Iterator = pool.imap(_work, jobs, chunksize=4) if pool else map(_work, jobs)
    bar_total = min(total, max_samples) if (total is not None and max_samples) else (max_samples or total)
    bar = _progress(progress)
    try:
        with bar:
            task = bar.add_task(f"{split}", total=bar_total) if bar is not None and hasattr(bar, "add_task") else None
            for item, result in results:
                n_in += 1
                if isinstance(result, BadSample):
                    if strict:
                        raise DataError(f"{item.where}: {result.reason}: {result.detail} (strict; drop --strict to skip and count)")
                    skipped[result.reason] += 1
                    if len(examples) < MAX_EXAMPLES:
                        examples.append({"where": item.where, "reason": result.reason, "detail": result.detail[:200]})
                else:
                    rec = result.record
                    key = _key(writer.total, rec.get("id", ""))
                    writer.write({"__key__": key, "json": json.dumps(rec).encode(), result.ext: result.image})
                    subsets[rec.get("subset", "")] += 1
                    sources[rec.get("source", "")] += 1
                    if result.conversion:
                        converted[result.conversion] += 1
                if task is not None:
                    bar.update(task, advance=1)
                if max_samples is not None and writer.total >= max_samples:
                    break
    finally:
        writer.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    written = writer.total
    manifest = {
        "version": MANIFEST_VERSION,
        "split": split,
        "pattern": shard_pattern(split),
        "input": n_in,
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
        "subsets": dict(sorted(subsets.items())),
        "sources": dict(sorted(sources.items())),
        "shards": writer.shards,
        "skipped_examples": examples,
        "builder": builder_args or {},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if written + sum(skipped.values()) != n_in:  # cannot happen; a guard against future edits
        raise RuntimeError(f"counts do not reconcile: {written} written + {sum(skipped.values())} skipped != {n_in} input")
    manifest_path(out, split).write_text(json.dumps(manifest, indent=2))
    return manifest


def _progress(enabled: bool):
    if not enabled:
        return nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("building {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def verify_split(out: str | Path, split: str, strict: bool = False) -> dict[str, Any]:
    """Re-read a built split: sha256 of every shard and read == written per shard (samples fully decoded)."""
    from .streams import read_samples
    from .schema import SkipStats

    out = Path(out)
    m = read_manifest(out, split)
    rows, stats = [], SkipStats(strict=strict)
    for s in m["shards"]:
        path = out / s["name"]
        if not path.is_file():
            rows.append({"name": s["name"], "expected": s["samples"], "read": 0, "sha256_ok": False, "missing": True})
            continue
        n = sum(1 for _ in read_samples([str(path)], stats))
        rows.append({"name": s["name"], "expected": s["samples"], "read": n, "sha256_ok": sha256_file(path) == s["sha256"]})
    read = sum(r["read"] for r in rows)
    ok = read == m["written"] and all(r["sha256_ok"] and r["read"] == r["expected"] for r in rows)
    return {"split": split, "written": m["written"], "read": read, "ok": ok, "shards": rows, "skipped_on_read": stats.skipped()}
