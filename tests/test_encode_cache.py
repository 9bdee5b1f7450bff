"""Samples encoded once (data.encode_cache): the same batches as encoding every time, no encoding on a cached read,
and a cache that never outlives what it was made from."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from visor_lightning.data import encode_cache
from visor_lightning.data.collate import Encoded, Encoder
from visor_lightning.data.datamodule import VisorDataModule


@pytest.fixture()
def copied(shards, tmp_path) -> Path:
    """The session's shards copied (the cache writes beside them)."""
    for url in shards.easy_urls + shards.hard_urls:
        shutil.copy(url, tmp_path)
    return tmp_path


@pytest.fixture()
def encodes(monkeypatch) -> list[str]:
    """The keys of the samples the Encoder runs on (counted, then encoded as usual)."""
    seen: list[str] = []
    real = Encoder.__call__

    def counting(self, conv, image):
        seen.append(conv.id)
        return real(self, conv, image)

    monkeypatch.setattr(Encoder, "__call__", counting)
    return seen


def _dm(shards, root: Path, cache: bool, **kw) -> VisorDataModule:
    dm = VisorDataModule(train=[str(root / "easy-*.tar"), str(root / "hard-*.tar")],
                         val={"easy": str(root / "easy-*.tar"), "hard": str(root / "hard-*.tar")},
                         tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=4, eval_batch_size=16,
                         num_workers=0, batches_per_epoch=40, shuffle_buffer=30, seed=3, encode_cache=cache, **kw)
    dm.setup("fit")
    return dm


def _read(dm: VisorDataModule) -> tuple[list[dict], list[list[dict]]]:
    return list(dm.train_dataloader()), [list(loader) for loader in dm.val_dataloader()]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


def test_cached_reads_give_the_same_batches_without_encoding(shards, copied, encodes):
    """Training (160 samples from the resampled, shuffled stream) and evaluation (all 120 samples) read through
    the cache equal the uncached reads, tensor for tensor; the second read encodes nothing: every shard that the
    first read went through to its end comes from .encoded/."""
    dms = [_dm(shards, copied, False)]
    plain = _read(dms[0])
    assert len(encodes) > 120 and not (copied / ".encoded").exists()
    encodes.clear()
    dms.append(_dm(shards, copied, True))
    first = _read(dms[1])
    assert len(encodes) >= 120  # the evaluation sets at least
    files = sorted((copied / ".encoded").glob("*/*.tar.pt"))
    assert len(files) == 9  # every shard (6 easy + 3 hard): evaluation reads each to its end
    encodes.clear()
    dms.append(_dm(shards, copied, True))
    second = _read(dms[2])
    assert encodes == []
    for a, b, c in zip((plain[0], *plain[1]), (first[0], *first[1]), (second[0], *second[1])):
        assert _same(a, b) and _same(a, c)
    counts = [dm.skip_counts()["total"] for dm in dms]  # cached samples are counted as read, as fresh ones are
    assert counts[0] == counts[1] == counts[2] and counts[0]["read"] >= 160 + 120


def test_a_changed_shard_or_encoder_is_encoded_again(shards, copied, encodes):
    _read(_dm(shards, copied, True))
    (fingerprint,) = [p.name for p in (copied / ".encoded").iterdir()]
    encodes.clear()
    shard = copied / "hard-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rebuilt (same bytes, new time)
    _read(_dm(shards, copied, True))
    assert sorted(set(encodes)) == sorted(set(encodes) & {f"synthetic-train-{i:07d}" for i in range(20, 40)})
    assert len(set(encodes)) == 20  # only that shard's 20 samples, and all of them
    encodes.clear()
    other = _dm(shards, copied, True, max_length=4000)  # another encoding: another fingerprint, nothing reused
    assert other.cache.fingerprint != fingerprint
    _read(other)
    assert len(set(encodes)) == 120


def test_shards_with_skipped_samples_are_not_cached_and_counted_every_time(shards, copied, encodes):
    """A shard whose samples are partly too long is read afresh each time, so its skip counts stay what an
    uncached read counts (a cached shard would have nothing to count)."""
    lengths = [len(Encoder(shards.tokenizer, shards.spec)(ex.conv, ex.image).input_ids)
               for ex in _examples(copied / "hard-000000.tar")]
    limit = sorted(lengths)[len(lengths) // 2]  # about half of that shard is too long
    counts = []
    for cache in (False, True, True):
        dm = VisorDataModule(val={"hard": str(copied / "hard-*.tar")}, tokenizer=shards.tokenizer_dir,
                             backbone=shards.spec, eval_batch_size=8, num_workers=0, max_length=limit, encode_cache=cache)
        dm.setup("validate")
        ids = [i for b in dm.val_dataloader()[0] for i in b["id"]]
        counts.append((sorted(ids), dm.skip_counts()["total"]))
    assert counts[0] == counts[1] == counts[2] and counts[0][1]["too_long"] > 0
    cached = {p.name for p in (copied / ".encoded").glob("*/*.pt")}
    assert all(f"{Path(u).name}.pt" not in cached for u in [str(copied / "hard-000000.tar")])


def test_a_broken_cache_file_is_read_afresh_and_replaced(shards, copied, encodes):
    _read(_dm(shards, copied, True))
    victim = next((copied / ".encoded").glob("*/easy-000002.tar.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    encodes.clear()
    with pytest.warns(UserWarning, match=r"easy-000002.tar.pt: unreadable encoded-sample cache"):
        again = _read(_dm(shards, copied, True))
    assert len(set(encodes)) == 10  # that shard's samples, once more
    assert encode_cache.EncodeCache(victim.parent.name).load(str(copied / "easy-000002.tar")) is not None
    assert _same(again[1][0], _read(_dm(shards, copied, False))[1][0])


def test_an_unwritable_directory_only_loses_the_speed_up(shards, copied, encodes):
    (copied / ".encoded").write_text("a file where the cache directory would go")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _read(_dm(shards, copied, True))
    assert any("cannot write the encoded-sample cache" in str(w.message) for w in caught)
    assert _same(batches[1][1], _read(_dm(shards, copied, False))[1][1])


def test_pixels_round_trip_exactly_with_and_without_a_palette():
    """A shard with <= 256 distinct pixel values is stored as bytes plus a palette, any other as float32; both
    give back every value bit for bit, whatever the crop counts."""
    g = torch.Generator().manual_seed(0)

    def sample(i: int, crops: int, pixels: torch.Tensor) -> Encoded:
        return Encoded(input_ids=torch.arange(i + 3), labels=torch.full((i + 3,), -100), prompt_ids=torch.arange(i + 1),
                       pixel_values=pixels, image_size=torch.tensor([32, 32 * crops]), meta={"id": f"s{i}", "task": "t"})

    levels = (torch.arange(256, dtype=torch.float32) / 255 - 0.5) / 0.5
    few = [sample(i, c, levels[torch.randint(0, 256, (c, 3, 8, 8), generator=g)]) for i, c in enumerate([1, 3, 2])]
    many = [sample(i, c, torch.randn(c, 3, 8, 8, generator=g)) for i, c in enumerate([2, 1])]
    for samples, packed_as in ((few, "codes"), (many, "pixels")):
        blob = encode_cache._pack(samples, [1, 2])
        assert packed_as in blob
        back = encode_cache._unpack(blob)
        for a, b in zip(samples, back):
            assert all(torch.equal(getattr(a, f), getattr(b, f))
                       for f in ("input_ids", "labels", "prompt_ids", "pixel_values", "image_size"))
            assert a.meta == b.meta


def _examples(url: Path):
    from visor_lightning.data.schema import SkipStats
    from visor_lightning.data.streams import read_samples

    return list(read_samples([str(url)], SkipStats()))


def test_swapped_image_streams_are_encoded_afresh(shards, copied):
    """The swapped-image control pairs each question with another sample's image: its samples are never the
    cached ones (a cached read would quietly give the real images back)."""
    def swapped(cache: bool) -> list[dict]:
        dm = VisorDataModule(val={"hard": str(copied / "hard-*.tar")}, tokenizer=shards.tokenizer_dir,
                             backbone=shards.spec, eval_batch_size=8, num_workers=0, encode_cache=cache)
        dm.setup("validate")
        dm.swap_images = True
        real, swap = dm.val_dataloader()
        return [list(real), list(swap)]

    plain = swapped(False)
    swapped(True)  # fills the cache
    cached = swapped(True)
    assert _same(plain[0], cached[0]) and _same(plain[1], cached[1])
    assert not torch.equal(cached[0][0]["pixel_values"], cached[1][0]["pixel_values"])
