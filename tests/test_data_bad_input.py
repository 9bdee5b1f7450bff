"""Every kind of bad input, planted in real files and real tars: counted when lenient, raised when strict."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from visor_lightning.data.schema import DataError, SkipStats
from visor_lightning.data.shards import build_shards
from visor_lightning.data.sources import llava_json_items
from visor_lightning.data.streams import read_samples


def _png(mode: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img = {"RGB": rgb, "L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P")}[mode]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500), (9, 9, 9)).save(buf, format="PNG")  # small file, 3M pixels
    return buf.getvalue()


def _conv(q="what shape?", a="circle"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


MAX_PIXELS = 1_000_000

# (record, image file content or None) -> expected outcome
CASES = {
    "good": ({"image": "good.png", "conversations": _conv()}, _png("RGB"), "ok"),
    "multi_turn": ({"image": "mt.png", "conversations": _conv() + [{"from": "human", "value": "colour?"}, {"from": "gpt", "value": "red"}]}, _png("RGB"), "ok"),
    "no_placeholder": ({"image": "np.png", "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}, _png("RGB"), "ok"),
    "gray": ({"image": "gray.png", "conversations": _conv()}, _png("L"), "converted_grayscale"),
    "rgba": ({"image": "rgba.png", "conversations": _conv()}, _png("RGBA"), "converted_rgba"),
    "palette": ({"image": "pal.png", "conversations": _conv()}, _png("P"), "converted_palette"),
    "corrupt": ({"image": "corrupt.jpg", "conversations": _conv()}, b"\xff\xd8\xff\xe0 not really a jpeg" * 4, "corrupt_image"),
    "missing_file": ({"image": "nowhere.png", "conversations": _conv()}, None, "missing_image"),
    "huge": ({"image": "huge.png", "conversations": _conv()}, _huge_png(), "image_too_large"),
    "no_conversations": ({"image": "good.png"}, None, "missing_conversations"),
    "empty_answer": ({"image": "good.png", "conversations": _conv(a="  ")}, None, "empty_answer"),
    "bad_turns": ({"image": "good.png", "conversations": [{"from": "gpt", "value": "x"}]}, None, "bad_conversation"),
    "two_placeholders": ({"image": "good.png", "conversations": _conv(q="<image> twice")}, None, "placeholder_mismatch"),
    "multi_image": ({"image": ["good.png", "gray.png"], "conversations": _conv()}, None, "multi_image"),
    "text_only": ({"conversations": _conv()}, None, "no_image"),
}


@pytest.fixture()
def llava_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for name, (rec, content, _) in CASES.items():
        if content is not None:
            (images / rec["image"]).write_bytes(content)
        records.append({"id": name, **rec})
    return tmp_path, images, records


def _expected_counts():
    skipped, converted = {}, {}
    for _, _, outcome in CASES.values():
        if outcome.startswith("converted_"):
            converted[outcome] = converted.get(outcome, 0) + 1
        elif outcome != "ok":
            skipped[outcome] = skipped.get(outcome, 0) + 1
    return skipped, converted


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_json_lenient_counts_every_reason(llava_dir, fmt):
    root, images, records = llava_dir
    src = root / f"data.{fmt}"
    if fmt == "json":
        src.write_text(json.dumps(records))
    else:
        src.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json at all\n[1, 2]\n")
    total, items = llava_json_items(src, images)
    m = build_shards(items, root / "out", "train", total=total, max_pixels=MAX_PIXELS, progress=False)
    skipped, converted = _expected_counts()
    if fmt == "jsonl":
        skipped["malformed_json"] = 2
    assert m["skipped"] == dict(sorted(skipped.items()))
    assert m["converted"] == dict(sorted(converted.items()))
    assert m["written"] + sum(m["skipped"].values()) == m["input"] == total
    ok = [k for k, (_, _, o) in CASES.items() if o == "ok" or o.startswith("converted_")]
    stats = SkipStats()
    got = {ex.conv.id: ex for ex in read_samples([str(root / "out" / s["name"]) for s in m["shards"]], stats)}
    assert sorted(got) == sorted(ok) and stats.read == m["written"] and stats.skipped() == {}
    assert got["multi_turn"].conv.turns[2:] == [("human", "colour?"), ("gpt", "red")]
    assert got["no_placeholder"].conv.turns[0][1].startswith("<image>\n")
    assert all(ex.image.mode == "RGB" for ex in got.values())
    where = {e["where"] for e in m["skipped_examples"]}
    assert any(w.startswith(str(src)) for w in where)


def test_llava_json_strict_names_file_and_record(llava_dir):
    root, images, records = llava_dir
    src = root / "data.json"
    src.write_text(json.dumps(records))
    total, items = llava_json_items(src, images)
    with pytest.raises(DataError, match=r"data\.json\[6\]: corrupt_image"):
        build_shards(items, root / "out", "train", total=total, strict=True, max_pixels=MAX_PIXELS, progress=False)


def test_malformed_json_list_file_is_an_error_with_position(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text('[{"id": "a", "conversations": []},\n {"id": "b",, }]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(.*line 2 column"):
        llava_json_items(src, tmp_path)


# ---- read time: bad samples inside real shards ----------------------------------------------------------
def _write_bad_shards(d):
    good_json = json.dumps({"id": "g", "conversations": _conv()}).encode()
    members = [
        {"__key__": "g0", "json": good_json.replace(b'"g"', b'"g0"'), "png": _png("RGB")},
        {"__key__": "corrupt", "json": good_json, "jpg": b"\xff\xd8\xff garbage"},
        {"__key__": "badjson", "json": b'{"id": "x", "conversations": [', "png": _png("RGB")},
        {"__key__": "noconv", "json": b'{"id": "y"}', "png": _png("RGB")},
        {"__key__": "empty", "json": json.dumps({"id": "e", "conversations": _conv(a="")}).encode(), "png": _png("RGB")},
        {"__key__": "noimage", "json": good_json},
        {"__key__": "nojson", "png": _png("RGB")},
        {"__key__": "gray", "json": good_json.replace(b'"g"', b'"gray"'), "png": _png("L")},
        {"__key__": "huge", "json": good_json, "png": _huge_png()},
        {"__key__": "g1", "json": good_json.replace(b'"g"', b'"g1"'), "png": _png("RGB")},
    ]
    with wds.TarWriter(str(d / "bad-000000.tar")) as w:
        for m in members:
            w.write(m)
    with wds.TarWriter(str(d / "full-000000.tar")) as w:
        for i in range(6):
            w.write({"__key__": f"t{i}", "json": good_json.replace(b'"g"', f'"t{i}"'.encode()), "png": _png("RGB", (200, 200))})
    full = (d / "full-000000.tar").read_bytes()
    (d / "trunc-000000.tar").write_bytes(full[: len(full) // 2])
    (d / "notatar-000000.tar").write_bytes(b"this is not a tar file" * 100)
    return [str(d / n) for n in ("bad-000000.tar", "trunc-000000.tar", "notatar-000000.tar")]


EXPECTED_READ_SKIPS = {
    "corrupt_image": 1, "malformed_json": 2, "missing_conversations": 1, "empty_answer": 1, "missing_image": 1,
    "image_too_large": 1, "truncated_shard": 1, "unreadable_shard": 1,
}


def test_read_lenient_counts_every_reason(tmp_path):
    urls = _write_bad_shards(tmp_path)
    stats = SkipStats()
    ids = [ex.conv.id for ex in read_samples(urls, stats, max_pixels=MAX_PIXELS)]
    assert ids[:3] == ["g0", "gray", "g1"]
    complete_before_cut = len(ids) - 3
    assert 1 <= complete_before_cut < 6  # samples fully inside the kept half survive; nothing after the cut
    assert ids[3:] == [f"t{i}" for i in range(complete_before_cut)]
    assert stats.skipped() == EXPECTED_READ_SKIPS
    assert stats.counts()["converted_grayscale"] == 1 and stats.read == len(ids)


@pytest.mark.parametrize("url_index, match", [
    (0, r"bad-000000\.tar key 'corrupt': corrupt_image"),
    (1, r"trunc-000000\.tar key 't\d': truncated_shard"),
    (2, r"notatar-000000\.tar: unreadable_shard"),
])
def test_read_strict_names_shard_and_key(tmp_path, url_index, match):
    urls = _write_bad_shards(tmp_path)
    with pytest.raises(DataError, match=match):
        list(read_samples([urls[url_index]], SkipStats(strict=True), max_pixels=MAX_PIXELS))


def test_counts_survive_dataloader_workers(tmp_path, shards):
    """Skips counted inside 2 worker processes reach the main process (shared-memory counters)."""
    from visor_lightning.data.datamodule import VisorDataModule

    urls = _write_bad_shards(tmp_path)
    dm = VisorDataModule(val={"bad": urls}, tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=2,
                         num_workers=2, max_pixels=MAX_PIXELS)
    dm.setup("validate")
    (loader,) = dm.val_dataloader()
    ids = [i for b in loader for i in b["id"]]
    counts = dm.skip_counts()["val/bad"]
    assert {k: v for k, v in counts.items() if k in EXPECTED_READ_SKIPS} == EXPECTED_READ_SKIPS
    assert counts["read"] == len(ids) >= 4


def test_strict_datamodule_raises_through_workers(tmp_path, shards):
    from visor_lightning.data.datamodule import VisorDataModule

    urls = _write_bad_shards(tmp_path)
    dm = VisorDataModule(val={"bad": urls[:1]}, tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=2,
                         num_workers=1, strict=True)
    dm.setup("validate")
    with pytest.raises(DataError, match=r"bad-000000\.tar key 'corrupt'"):
        list(dm.val_dataloader()[0])
