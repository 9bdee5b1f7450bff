"""Streaming shards: tar members -> validated samples -> encoded samples -> batches.

Training streams are infinite (WebDataset's ``ResampledShards``, a per-rank/worker seed) cut by ``with_epoch``
into a fixed number of full batches per worker, so every rank runs the same number of steps and DDP never
waits on a rank that ran dry. Evaluation streams are finite: ``split_by_node`` then ``split_by_worker`` over the
shard list, so each sample is read exactly once across all ranks and workers. The rank is taken in the main
process (a forkserver-started worker has no process group to ask). With the encoded-sample cache
(``data.encode_cache``, encode_cache.py) samples are encoded shard by shard as they are read, and a shard seen
before is loaded already encoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import signal
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .encode_cache import EncodeCache
from .images import DEFAULT_MAX_PIXELS, image_fingerprint, open_image
from .schema import IMAGE_EXTS, BadSample, Conversation, DataError, SkipStats, parse_json_bytes, parse_record


@dataclass
class Example:
    key: str
    url: str
    conv: Conversation
    image: Any  # PIL.Image in RGB


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar shard, streamed (local path, ``pipe:`` or URL)."""
    import webdataset as wds

    with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``) as WebDataset does (first dot of the basename)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def raw_samples(url: str, stats: SkipStats) -> Iterator[dict[str, Any]]:
    """Group consecutive members by key. A shard that cannot be opened, or ends mid-member, is counted once
    (``unreadable_shard`` / ``truncated_shard``); samples already complete before the damage are kept."""
    current: dict[str, Any] | None = None
    members = 0
    try:
        for name, data in tar_members(url):
            members += 1
            key, ext = _split_name(name)
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = "truncated_shard" if members else "unreadable_shard"
        stats.skip(BadSample(reason, f"{type(e).__name__}: {e}"), url, current["__key__"] if current else None)
        if current is not None and "json" in current and any(x in current for x in IMAGE_EXTS):
            yield current  # its members were read completely before the damage
        return
    if current is not None:
        yield current


def decode_sample(raw: dict[str, Any], stats: SkipStats, max_pixels: int = DEFAULT_MAX_PIXELS) -> Example | None:
    """Validated sample, or None after counting (lenient) / raising DataError (strict) with shard and key."""
    key, url = raw["__key__"], raw["__url__"]
    try:
        if "json" not in raw:
            raise BadSample("malformed_json", "no .json member for this key")
        conv = parse_record(parse_json_bytes(raw["json"]))
        ext = next((x for x in IMAGE_EXTS if x in raw), None)
        if ext is None:
            raise BadSample("missing_image", f"no image member ({'/'.join(IMAGE_EXTS)}) for this key")
        image, conversion = open_image(raw[ext], max_pixels)
    except BadSample as bad:
        stats.skip(bad, url, key)
        return None
    if conversion:
        stats.add(conversion)
    return Example(key, url, conv, image)


def read_samples(urls: Iterable[str | dict], stats: SkipStats, max_pixels: int = DEFAULT_MAX_PIXELS,
                 on_shard_end: Callable[[str, int], None] | None = None) -> Iterator[Example]:
    """Every valid sample of the shards in order (``urls`` may be WebDataset's ``{"url": ...}`` dicts);
    ``on_shard_end(url, valid)`` hears how many valid samples each shard gave once it is read to its end."""
    for u in urls:
        url = u["url"] if isinstance(u, dict) else u
        valid = 0
        for raw in raw_samples(url, stats):
            ex = decode_sample(raw, stats, max_pixels)
            if ex is not None:
                stats.add("read")
                valid += 1
                yield ex
        if on_shard_end is not None:
            on_shard_end(url, valid)


class StarvationGuard:
    """A resampled training stream never ends by itself, so shards that hold no usable sample would be drawn
    forever without a word. Once every shard has been read, this raises a DataError if none gave a valid sample,
    or if every sample that was read failed to encode (too long, tokenizer mismatch, ...): nothing to train on.
    """

    def __init__(self, urls: Iterable[str], stats: SkipStats) -> None:
        self.urls, self.stats = set(urls), stats
        self.read: set[str] = set()  # shards read to their end
        self.gave: set[str] = set()  # ... that gave at least one valid sample
        self.failed: set[str] = set()  # shards with a sample that failed to encode
        self.encoded = False

    def shard_read(self, url: str, valid: int) -> None:
        self.read.add(url)
        if valid:
            self.gave.add(url)
        self._check()

    def encode_failed(self, url: str) -> None:
        self.failed.add(url)
        self._check()

    def _check(self) -> None:
        if self.encoded or self.read != self.urls:
            return
        n = len(self.urls)
        if not self.gave:
            raise DataError(f"none of the {n} training shard(s) holds a valid sample (e.g. {min(self.urls)}); "
                            f"skipped so far: {self.stats.skipped()}. Rebuild the shards or check data.train")
        if self.gave <= self.failed:
            raise DataError(f"no training sample of the {n} shard(s) could be encoded (e.g. {min(self.gave)}); "
                            f"skipped so far: {self.stats.skipped()}. Check data.max_length and the tokenizer")


def swap_images(examples: Iterable[Example]) -> Iterator[Example]:
    """The vision-dependence control: every example with another example's image (question and answer kept).

    Each example takes the image of the nearest earlier example whose image differs (pixel fingerprint), so
    consecutive questions about one image (easy-vqa, multi-question sets) still get a different image; the
    first run of equal images takes the first different image that follows. Deterministic for a fixed stream
    order; memory holds one run of equal images. Raises when the stream has a single distinct image.
    """
    pending: list[Example] = []  # the leading run: no different image seen yet
    first_fp: str | None = None  # that run's fingerprint
    prev: Any = None  # the image of the latest run before the current one
    cur: tuple[str, Any] | None = None  # the current run's (fingerprint, image)
    for ex in examples:
        fp = image_fingerprint(ex.image)
        if cur is not None and fp != cur[0]:
            prev = cur[1]
        cur = (fp, ex.image)
        if first_fp is None:
            first_fp = fp
        if pending and fp != first_fp:
            yield from (dataclasses.replace(p, image=ex.image) for p in pending)
            pending = []
        if prev is None:
            pending.append(ex)
        else:
            yield dataclasses.replace(ex, image=prev)
    if pending:
        raise ValueError(f"cannot swap images: the {len(pending)} sample(s) of this stream share one image "
                         f"(first {pending[0].key!r} in {pending[0].url}); an evaluation set needs >= 2 images per "
                         "rank and loader worker")


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


class ShardStream(IterableDataset):
    """Batches of encoded samples from WebDataset shards; see the module docstring for train vs eval.

    ``encode`` turns an :class:`Example` into a model sample (raising BadSample to skip it); ``collate`` turns a
    list of those into a batch. ``epoch`` is set by :class:`StreamLoader` before workers start, so every epoch
    (and a resumed run) draws a different, reproducible stream.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        train: bool,
        batch_size: int,
        encode: Callable[[Example], Any],
        collate: Callable[[list[Any]], Any],
        stats: SkipStats,
        batches_per_worker: int = 0,
        shuffle_buffer: int = 256,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        swap: bool = False,
        shuffle_initial: int = 64,
        cache: EncodeCache | None = None,
    ) -> None:
        super().__init__()
        if swap and train:
            raise ValueError("swap (the swapped-image control) is for evaluation streams only")
        if not urls:
            raise ValueError("no shards given")
        if train and batches_per_worker < 1:
            raise ValueError("a training stream needs batches_per_worker >= 1 (its epoch length)")
        self.urls, self.train, self.batch_size = list(urls), train, batch_size
        self.encode, self.collate, self.stats = encode, collate, stats
        self.batches_per_worker, self.shuffle_buffer = batches_per_worker, shuffle_buffer
        self.seed, self.max_pixels, self.swap = seed, max_pixels, swap
        self.shuffle_initial = shuffle_initial
        self.cache = None if swap else cache  # a swapped stream pairs other samples' images: encoded afresh
        self.epoch = 0
        self.num_workers = 0  # set by StreamLoader; gives the epoch length
        self.rank, self.world_size = 0, 1  # set by StreamLoader in the main process (workers may not know it)

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("an evaluation stream has no length known before reading (shards split by rank/worker)")
        return self.batches_per_worker * max(1, self.num_workers)

    def _encoded(self, examples: Iterable[Example], guard: StarvationGuard | None = None) -> Iterator[Any]:
        for ex in examples:
            try:
                encoded = self.encode(ex)
            except BadSample as bad:
                self.stats.skip(bad, ex.url, ex.key)
                if guard is not None:
                    guard.encode_failed(ex.url)
                continue
            if guard is not None:
                guard.encoded = True
            yield encoded

    def _read_encoded(self, urls: Iterable[str | dict], guard: StarvationGuard | None = None) -> Iterator[Any]:
        """Encoded samples shard by shard, through the encoded-sample cache (``data.encode_cache``): a cached
        shard is loaded, any other is read and encoded and, when every sample of it was valid, saved."""
        assert self.cache is not None
        for u in urls:
            url = u["url"] if isinstance(u, dict) else u
            hit = self.cache.load(url)
            if hit is not None:  # counted as read sample by sample, as a fresh read counts them
                for enc in hit:
                    self.stats.add("read")
                    if guard is not None:
                        guard.encoded = True
                    yield enc
                if guard is not None:
                    guard.shard_read(url, len(hit))
                continue
            mark, fresh = self.stats.mark(), []
            on_end = guard.shard_read if guard is not None else None
            for enc in self._encoded(read_samples([url], self.stats, self.max_pixels, on_shard_end=on_end), guard):
                fresh.append(enc)
                yield enc
            if self.stats.only_read_since(mark):
                self.cache.save(url, fresh)

    def pipeline(self):
        import webdataset as wds

        worker_info = torch.utils.data.get_worker_info()
        worker = worker_info.id if worker_info is not None else 0
        rank, world = self.rank, self.world_size
        if self.train:
            seed = _seed(self.seed, self.epoch, rank, worker)
            shards = wds.ResampledShards(self.urls, worker_seed=lambda: 0, seed=seed, deterministic=True)
            guard = StarvationGuard(self.urls, self.stats)
            shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, self.shuffle_initial),
                                  rng=random.Random(seed))
            if self.cache is not None:  # encoded before the shuffle: the buffer holds encoded samples
                stages = [shards, lambda src: self._read_encoded(src, guard), shuffle]
            else:
                stages = [
                    shards,
                    lambda src: read_samples(src, self.stats, self.max_pixels, on_shard_end=guard.shard_read),
                    shuffle,
                    lambda src: self._encoded(src, guard),
                ]
            stages.append(wds.batched(self.batch_size, collation_fn=self.collate, partial=False))
            return wds.DataPipeline(*stages).with_epoch(self.batches_per_worker)
        mine = self.urls[rank::world]  # split by node (as wds.split_by_node, with the rank passed in)
        if not mine:  # fewer shards than ranks: this rank has nothing to evaluate
            return iter(())
        stages = [
            wds.SimpleShardList(mine),
            wds.split_by_worker,
            *([self._read_encoded] if self.cache is not None else [
                lambda src: read_samples(src, self.stats, self.max_pixels),
                *([swap_images] if self.swap else []),
                self._encoded,
            ]),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=True),
        ]
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.pipeline())


WORKER_PRELOAD = ["visor_lightning.data.streams", "visor_lightning.data.collate", "visor_lightning.data.datamodule"]


def ignore_preemption_signal(worker_id: int = 0) -> None:
    """Slurm's ``--signal=SIGUSR1@90`` reaches every process of the job step, workers included, and SIGUSR1's
    default action kills them. The training process checkpoints on it (callbacks/preemption.py); workers ignore it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _start_forkserver_deaf_to_preemption() -> None:
    """Start the fork server with SIGUSR1 ignored (inherited across its exec), so the signal cannot kill it."""
    from multiprocessing import forkserver

    try:
        old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave it to the default start
        return
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGUSR1, old)


class StreamLoader(DataLoader):
    """DataLoader over a :class:`ShardStream` (batching happens in the stream, so ``batch_size=None``).

    ``start_method="auto"`` starts workers from a ``forkserver`` once a process group exists: forking a DDP rank
    that already runs gloo threads can deadlock inside ``fork()`` (seen with 2 ranks x 2 workers: a worker hung
    forever and its rank with it). The fork server is single-threaded and has the data modules imported, so
    workers still start quickly; the stream (and its shared-memory counters) is pickled to them. Without a
    process group it forks, as PyTorch does by default (a forkserver would need a ``__main__`` guard in every
    user script).
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, start_method: str = "auto", **kwargs: Any) -> None:
        import multiprocessing as mp

        import torch.distributed as dist

        stream.num_workers = num_workers
        context = None
        if num_workers > 0:
            if start_method == "auto":
                start_method = "forkserver" if dist.is_available() and dist.is_initialized() else "fork"
            context = mp.get_context(start_method)
            if start_method == "forkserver":
                context.set_forkserver_preload(WORKER_PRELOAD)
                _start_forkserver_deaf_to_preemption()
            kwargs.setdefault("worker_init_fn", ignore_preemption_signal)
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         multiprocessing_context=context, **kwargs)

    def __iter__(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.dataset.rank, self.dataset.world_size = dist.get_rank(), dist.get_world_size()
        it = super().__iter__()  # workers receive the dataset as it is now
        self.dataset.epoch += 1
        return it
