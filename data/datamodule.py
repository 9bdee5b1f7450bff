"""The streaming LightningDataModule: WebDataset shards in, batches for ``VisorModel`` out.

Training: resampled shards, a fixed number of full batches per epoch on every rank (``batches_per_epoch``),
different shuffles per rank and worker. Evaluation: one finite loader per named shard set (benchmark or
subset), each sample seen exactly once across ranks and workers. Bad samples are skipped and counted per
reason (``skip_counts()``; the DataStats callback logs them), or raise with shard and key when ``strict``.
"""

from __future__ import annotations

import functools
import glob
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from visor_lightning.models.spec import BackboneSpec

from .collate import Encoder, collate, image_processor_for
from .encode_cache import EncodeCache, encoder_fingerprint
from .images import DEFAULT_MAX_PIXELS
from .schema import SkipStats, merge_counts
from .streams import Example, ShardStream, StreamLoader
from .tokenizer import load_tokenizer

# Our training streams' __len__ is exact by construction (with_epoch per worker x workers), which is what
# Lightning's generic warning about IterableDataset lengths under multi-process loading cannot know.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")

SWAPPED = "/swapped"  # suffix of a val set's swapped-image copy (``easy`` -> ``easy/swapped``)


def resolve_shards(spec: str | list[str], *, field: str = "shards") -> list[str]:
    """Shard list from a glob (``dir/train-*.tar``), brace notation (``train-{000000..000003}.tar``), a
    ``{split}-manifest.json`` (its shards, in order), a URL/``pipe:`` spec, or a list of any of these."""
    import webdataset as wds

    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in resolve_shards(s, field=field)]
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{field}: expected a shard glob, brace pattern, manifest or URL, got {spec!r}")
    if spec.endswith("-manifest.json"):
        from .shards import split_urls

        path = Path(spec)
        return _existing(split_urls(path.parent, path.name.removesuffix("-manifest.json")), field, f" (listed by {spec})")
    if "://" in spec or spec.startswith("pipe:"):
        return list(wds.shardlists.expand_urls(spec))
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"{field}: no shards match {spec!r}")
        return _existing(found, field)  # a glob also lists dangling symlinks
    return _existing(list(wds.shardlists.expand_urls(spec)), field)


def _existing(urls: list[str], field: str, source: str = "") -> list[str]:
    """``urls`` if every local shard is an existing file; otherwise a FileNotFoundError naming the first missing one
    (a training stream resamples its shards, so a missing one would otherwise be skipped over and over)."""
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{field}: shard {missing[0]!r} does not exist ({len(missing)} of {len(urls)} missing)"
                                f"{source}")
    return urls


class _EncodeExample:
    """Picklable ``Example -> Encoded`` for DataLoader workers."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __call__(self, ex: Example):
        return self.encoder(ex.conv, ex.image)


class VisorDataModule(pl.LightningDataModule):
    """Streams LLaVA-format image-text shards for a LLaVA-OV-shaped backbone.

    Args:
        train: training shards (glob, brace pattern, manifest, URL, or a list of these).
        val: named development sets, e.g. ``{easy: data/easy-dev-*.tar, hard: ...}``; one loader each. Validation
            during training and ``visor eval`` read them (tune on these).
        test: named held-out sets, same form; read only by ``visor test`` and ``visor eval --sets test`` (never
            during training).
        tokenizer: tokenizer directory; defaults to ``backbone.pretrained`` (the checkpoint's own).
        backbone: the model's shapes (image token id, crop size, pinpoints -> visual tokens per image).
        image_processor: directory with a ``preprocessor_config.json``; default: the checkpoint's, else built
            from ``backbone``.
        batch_size: per-device batch size; training batches are always full.
        eval_batch_size: per-device batch size of evaluation (default: batch_size).
        num_workers: DataLoader worker processes per rank (decode + tokenise + tile).
        batches_per_epoch: training batches per epoch on every rank (rounded up to a multiple of workers).
        shuffle_buffer: samples held for shuffling the resampled training stream.
        shuffle_initial: samples read before the first is yielded (None: the whole ``shuffle_buffer``). The
            default starts after 64, so the first batches come from the first shards read: for a short stage on
            several single-family shard sets (a policy's 40 steps) that is one family for most of the run; a full
            buffer mixes them from the first batch (raw samples are buffered, before decoding: cheap).
        max_length: samples with more tokens (visual ones included) are skipped and counted as ``too_long``.
        max_pixels: images with more pixels are skipped and counted as ``image_too_large``.
        strict: raise on the first bad sample (naming shard and key) instead of skipping and counting.
        seed: seeds the resampled training stream (with epoch, rank and worker).
        pad_to_multiple_of: round every batch's sequence lengths up to a multiple of this (for ``model.compile``:
            each new length is one more compile; 1 = pad to the longest sample only).
        encode_cache: keep each shard's encoded samples beside it (``<shard dir>/.encoded/``) once read, so later
            reads skip decoding, the chat template, the tokenizer and the image processor (data/encode_cache.py).
            Pays for small images (the demo's 32-px scenes: ~6 KB a sample on disk); a 0.5B LLaVA-OV AnyRes sample
            takes 4-18 MB, so it is off by default. Training then shuffles encoded samples.
        encode_cache_dir: keep the encoded samples here instead of beside the shards (read-only data, benchmarks);
            setting it turns the cache on.
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: dict[str, str | list[str]] | None = None,
        test: dict[str, str | list[str]] | None = None,
        tokenizer: str | None = None,
        backbone: BackboneSpec | None = None,
        image_processor: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 100,
        shuffle_buffer: int = 256,
        shuffle_initial: int | None = 64,
        max_length: int = 4096,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
        seed: int = 0,
        pad_to_multiple_of: int = 1,
        encode_cache: bool = False,
        encode_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or batches_per_epoch < 1 or num_workers < 0:
            raise ValueError("data: batch_size and batches_per_epoch must be >= 1, num_workers >= 0")
        self.train_spec, self.val_spec, self.test_spec = train, dict(val or {}), dict(test or {})
        self.eval_split = "val"  # which sets evaluation reads: "val" (data.val) or "test" (data.test)
        self.test_urls: dict[str, list[str]] | None = None  # resolved on first use (use_split): fit never reads them
        self.test_stats: dict[str, SkipStats] = {}
        self.backbone = backbone  # None: the LightningModule's (``.spec``) at setup time
        self.tokenizer_path, self.image_processor_path = tokenizer, image_processor
        if backbone is not None and tokenizer is None and backbone.pretrained is None:
            raise ValueError("data.tokenizer is required (or set backbone.pretrained to a checkpoint with one)")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.max_length, self.max_pixels = shuffle_buffer, max_length, max_pixels
        self.shuffle_initial = shuffle_buffer if shuffle_initial is None else shuffle_initial
        if pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.encode_cache, self.encode_cache_dir = encode_cache, encode_cache_dir
        self.cache: EncodeCache | None = None
        if not 1 <= self.shuffle_initial or shuffle_buffer < 1:
            raise ValueError(f"data: shuffle_buffer ({shuffle_buffer}) and shuffle_initial ({shuffle_initial}) must be >= 1")
        self.strict, self.seed = strict, seed
        self.swap_images = False  # visor eval sets it: every val set is also read with images swapped
        self.encoder: Encoder | None = None
        self.train_stats: SkipStats | None = None
        self.val_stats: dict[str, SkipStats] = {}

    def setup(self, stage: str | None = None) -> None:
        """Per process (after DDP start): tokenizer, image processor, shard lists, and this rank's counters."""
        if self.encoder is None:
            if self.backbone is None:
                module = getattr(getattr(self, "trainer", None), "lightning_module", None)
                if module is None or not hasattr(module, "spec"):
                    raise ValueError("data.backbone is not set and there is no VISOR LightningModule to take it from")
                self.backbone = module.spec
            pretrained = self.backbone.pretrained
            if self.tokenizer_path is None and pretrained is None:
                raise ValueError("data.tokenizer is required (or set backbone.pretrained to a checkpoint with one)")
            tok = load_tokenizer(self.tokenizer_path or pretrained)
            proc = image_processor_for(self.backbone, self.image_processor_path or pretrained)
            self.encoder = Encoder(tok, self.backbone, proc, self.max_length)
            if self.encode_cache or self.encode_cache_dir:
                self.cache = EncodeCache(encoder_fingerprint(self.encoder, self.max_pixels), self.encode_cache_dir)
            self.train_urls = resolve_shards(self.train_spec, field="data.train") if self.train_spec else []
            self.val_urls = {k: resolve_shards(v, field=f"data.val.{k}") for k, v in self.val_spec.items()}
            self.train_stats = SkipStats(self.strict, max_workers=max(1, self.num_workers))
            self.val_stats = {k: SkipStats(self.strict, max_workers=max(1, self.num_workers)) for k in self.val_urls}

    @property
    def eval_spec(self) -> dict[str, str | list[str]]:
        """The sets evaluation reads: ``data.val``, or ``data.test`` once ``eval_split`` is "test"."""
        return self.test_spec if self.eval_split == "test" else self.val_spec

    def use_split(self, split: str) -> None:
        """Evaluate on ``data.val`` ("val") or ``data.test`` ("test"; its shards are resolved here, not before)."""
        if split not in ("val", "test"):
            raise ValueError(f"evaluation sets must be 'val' (data.val) or 'test' (data.test), got {split!r}")
        if split == "test":
            if not self.test_spec:
                raise ValueError("data.test is not set: name the held-out sets in the config (data.test: {name: "
                                 "manifest, ...}) or pass --data.test '{name: manifest}'")
            if self.test_urls is None:
                self.test_urls = {k: resolve_shards(v, field=f"data.test.{k}") for k, v in self.test_spec.items()}
                self.test_stats = {k: SkipStats(self.strict, max_workers=max(1, self.num_workers)) for k in self.test_urls}
        self.eval_split = split

    @property
    def val_names(self) -> list[str]:
        """The evaluation sets in loader order: each ``data.val`` set, then (under ``swap_images``) its copy with
        every sample's image swapped for another sample's (the vision-dependence control)."""
        names = list(self.eval_spec)
        return names + [n + SWAPPED for n in names] if self.swap_images else names

    @property
    def batches_per_worker(self) -> int:
        return math.ceil(self.batches_per_epoch / max(1, self.num_workers))

    def _stream(self, urls: list[str], train: bool, stats: SkipStats, batch_size: int, swap: bool = False) -> ShardStream:
        assert self.encoder is not None, "call setup() first"
        return ShardStream(
            urls, train=train, batch_size=batch_size, encode=_EncodeExample(self.encoder),
            collate=functools.partial(collate, pad_id=self.encoder.pad_id, pad_to_multiple_of=self.pad_to_multiple_of), stats=stats,
            batches_per_worker=self.batches_per_worker if train else 0, shuffle_buffer=self.shuffle_buffer,
            shuffle_initial=self.shuffle_initial, seed=self.seed, max_pixels=self.max_pixels, swap=swap,
            cache=self.cache,
        )

    def train_dataloader(self) -> StreamLoader:
        self.setup("fit")
        if not self.train_urls:
            raise ValueError("data.train is not set: no training shards")
        stream = self._stream(self.train_urls, True, self.train_stats, self.batch_size)
        trainer = getattr(self, "trainer", None)
        stream.epoch = trainer.current_epoch if trainer is not None else 0  # a resumed run draws new data
        return StreamLoader(stream, num_workers=self.num_workers)

    def _eval_loaders(self) -> list[StreamLoader]:
        self.setup("validate")
        urls_by_set, stats = (self.test_urls, self.test_stats) if self.eval_split == "test" else (self.val_urls, self.val_stats)
        loaders = [
            StreamLoader(self._stream(urls, False, stats[name], self.eval_batch_size), num_workers=self.num_workers)
            for name, urls in urls_by_set.items()
        ]
        if self.swap_images:  # the same shards again; their reads are counted in the real set's stats
            loaders += [StreamLoader(self._stream(urls, False, SkipStats(self.strict, max_workers=max(1, self.num_workers)),
                                                  self.eval_batch_size, swap=True), num_workers=self.num_workers)
                        for urls in urls_by_set.values()]
        return loaders

    def val_dataloader(self) -> list[StreamLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[StreamLoader]:
        """``visor test``: the held-out ``data.test`` sets (metrics under ``test/``)."""
        self.use_split("test")
        return self._eval_loaders()

    def skip_counts(self) -> dict[str, Any]:
        """This process's counts: ``{"train": {...}, "val/<name>": {...}, "total": {...}}`` (reason -> n)."""
        out: dict[str, Any] = {}
        if self.train_stats is not None:
            out["train"] = self.train_stats.counts()
        for k, s in self.val_stats.items():
            out[f"val/{k}"] = s.counts()
        for k, s in self.test_stats.items():
            out[f"test/{k}"] = s.counts()
        out["total"] = merge_counts(*out.values())
        return out
