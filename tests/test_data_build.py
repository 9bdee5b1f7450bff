"""Shard building and reading: exact round trips, reproducible bytes, the manifest, the CLI."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from visor_lightning.cli import main
from visor_lightning.data.schema import SkipStats
from visor_lightning.data.shards import build_shards, read_manifest, sha256_file, split_urls, verify_split
from visor_lightning.data.sources import easy_vqa_items, synthetic_items
from visor_lightning.data.streams import read_samples
from visor_lightning.data.synthetic import SyntheticConfig, make_sample


def _expected_easy(n: int) -> set[tuple[str, str]]:
    import easy_vqa

    _, answers, _ = easy_vqa.get_train_questions()
    return {(f"easyvqa-train-{i:06d}", answers[i]) for i in range(n)}


def test_build_then_read_returns_exactly_the_input(shards):
    stats = SkipStats()
    got = [(ex.conv.id, ex.conv.answer) for ex in read_samples(shards.easy_urls, stats)]
    assert sorted(got) == sorted(_expected_easy(60)) and len(got) == 60
    hard = [(ex.conv.id, ex.conv.answer, ex.conv.extra["task"]) for ex in read_samples(shards.hard_urls, stats)]
    want = []
    for i in range(60):
        rec, _ = make_sample(SyntheticConfig(image_size=96), 0, "train", i)
        want.append((rec["id"], rec["conversations"][1]["value"], rec["task"]))
    assert hard == want
    assert stats.skipped() == {} and stats.read == 120


def test_shards_are_plain_webdataset(shards):
    """Any WebDataset reader sees the same samples: <key>.json (LLaVA format) + <key>.png."""
    ds = wds.WebDataset(shards.easy_urls, shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert len(samples) == 60
    rec = json.loads(samples[0]["json"])
    assert set(rec) >= {"id", "conversations", "source", "subset"} and rec["subset"] == "easy"
    assert rec["conversations"][0]["from"] == "human" and "<image>" in rec["conversations"][0]["value"]
    assert samples[0]["png"][:4] == b"\x89PNG" and "." not in samples[0]["__key__"]


def test_manifest_counts_and_hashes(shards):
    m = read_manifest(shards.root, "easy")
    assert m["input"] == m["written"] == 60 and m["skipped"] == {}
    assert [s["samples"] for s in m["shards"]] == [10] * 6
    assert all(sha256_file(shards.root / s["name"]) == s["sha256"] for s in m["shards"])
    assert m["subsets"] == {"easy": 60} and m["sources"] == {"easy-vqa": 60}
    assert verify_split(shards.root, "hard")["ok"]


def test_bytes_do_not_depend_on_worker_count(tmp_path):
    cfg = SyntheticConfig(image_size=64)
    hashes = []
    for workers in (0, 2):
        total, items = synthetic_items("val", 7, 25, cfg)
        m = build_shards(items, tmp_path / f"w{workers}", "val", total=total, shard_size=10, workers=workers, progress=False)
        hashes.append([s["sha256"] for s in m["shards"]])
    assert hashes[0] == hashes[1] and len(hashes[0]) == 3


def test_synthetic_is_deterministic_and_split_dependent():
    cfg = SyntheticConfig(image_size=64)
    a, img_a = make_sample(cfg, 3, "train", 5)
    b, img_b = make_sample(cfg, 3, "train", 5)
    assert a == b and img_a.tobytes() == img_b.tobytes()
    # split-dependent: the same seed and index draw other images (and questions) in another split, for every task
    for i in range(6):
        (x, img_x), (y, img_y) = make_sample(cfg, 3, "train", i), make_sample(cfg, 3, "test", i)
        assert img_x.tobytes() != img_y.tobytes(), i
        assert x["task"] == y["task"]  # same task by index: the images differ because the split does
    tasks = {make_sample(cfg, 0, "train", i)[0]["task"] for i in range(3)}
    assert tasks == {"read", "count", "chart"}
    with pytest.raises(ValueError, match="tasks"):
        SyntheticConfig(tasks=("read", "ocr"))


def test_count_answers_match_the_drawn_objects():
    """The count task's answer is the number of target-coloured circles actually drawn (checked on pixels)."""
    import numpy as np
    from scipy import ndimage

    from visor_lightning.data.synthetic import COLOURS

    cfg = SyntheticConfig(image_size=256, tasks=("count",))
    for i in range(6):
        rec, img = make_sample(cfg, 1, "train", i)
        colour = rec["conversations"][0]["value"].split("How many ")[1].split(" ")[0]
        px = np.asarray(img).astype(int)
        mask = (np.abs(px - np.array(COLOURS[colour])).sum(-1) < 10)
        labels, n = ndimage.label(mask)
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        boxes = ndimage.find_objects(labels)
        # circles fill ~pi/4 of their bounding box, squares all of it
        circles = sum(1 for s, b in zip(sizes, boxes) if s / ((b[0].stop - b[0].start) * (b[1].stop - b[1].start)) < 0.9)
        assert circles == int(rec["conversations"][1]["value"]), (i, rec)


def test_max_samples_and_overwrite(tmp_path):
    total, items = easy_vqa_items("test")
    m = build_shards(items, tmp_path, "test", total=total, shard_size=4, max_samples=9, progress=False)
    assert m["written"] == 9 and [s["samples"] for s in m["shards"]] == [4, 4, 1]
    total, items = easy_vqa_items("test")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_shards(items, tmp_path, "test", total=total, max_samples=3, progress=False)
    total, items = easy_vqa_items("test")
    build_shards(items, tmp_path, "test", total=total, shard_size=4, max_samples=3, overwrite=True, progress=False)
    assert len(split_urls(tmp_path, "test")) == 1 and len(list(tmp_path.glob("test-*.tar"))) == 1


def test_cli_build_verify_tokenizer(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "build", "--source", "synthetic", "--out", str(out), "--split", "val", "--max-samples", "12",
                 "--shard-size", "5", "--image-size", "64", "--tasks", "count,chart", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "val: 12 written + 0 skipped = 12 input, 3 shard(s)" in text
    m = read_manifest(out, "val")
    assert m["builder"]["tasks"] == "count,chart" and m["builder"]["seed"] == 0
    assert main(["data", "verify", "--dir", str(out), "--split", "val"]) == 0
    assert "read 12 of 12 written" in capsys.readouterr().out
    assert main(["data", "tokenizer", "--shards", str(out / "val-*.tar"), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert "<image> = 3" in capsys.readouterr().out
    # tamper with a shard: verify fails and says which
    shard = out / "val-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF  # inside the first member's data: the tar still parses
    shard.write_bytes(bytes(raw))
    assert main(["data", "verify", "--dir", str(out), "--split", "val"]) == 1
    assert "| val-000001.tar | 5 |" in (text := capsys.readouterr().out) and "MISMATCH" in text and "FAILED" in text


def test_cli_build_errors(tmp_path, capsys):
    assert main(["data", "build", "--source", "llava-json", "--out", str(tmp_path)]) == 2
    assert "needs --json FILE and --images DIR" in capsys.readouterr().err
    assert main(["data", "build", "--source", "llava-json", "--out", str(tmp_path), "--json", str(tmp_path / "nope.json"),
                 "--images", str(tmp_path)]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["data", "verify", "--dir", str(tmp_path), "--split", "train"]) == 2
    assert "train-manifest.json does not exist" in capsys.readouterr().err


def test_cli_builds_descriptions_held_out_from_two_splits(tmp_path, capsys):
    """Alignment data from the CLI, and an evaluation split that reuses no image of either of two built splits."""
    from visor_lightning.data.images import image_fingerprint
    from visor_lightning.data.scenes import DESCRIBE

    out = str(tmp_path)
    common = ["--source", "synthetic", "--out", out, "--image-size", "32", "--tasks", "shape", "--shard-size", "400",
              "--no-progress"]
    assert main(["data", "build", *common, "--split", "align", "--describe", "--max-samples", "300", "--seed", "1"]) == 0
    assert main(["data", "build", *common, "--split", "train", "--max-samples", "300", "--seed", "2"]) == 0
    assert main(["data", "build", *common, "--split", "test", "--max-samples", "300", "--seed", "3",
                 "--exclude-images-of", "align,train"]) == 0
    assert "excluding the" in capsys.readouterr().out
    read = {s: list(read_samples(split_urls(out, s), SkipStats())) for s in ("align", "train", "test")}
    assert {ex.conv.turns[0][1] for ex in read["align"]} == {f"<image>\n{DESCRIBE}"}
    seen = {image_fingerprint(ex.image) for s in ("align", "train") for ex in read[s]}
    assert not seen & {image_fingerprint(ex.image) for ex in read["test"]}
    assert main(["data", "build", *common, "--split", "x", "--exclude-images-of", "align,nope"]) == 2
    assert "--exclude-images-of nope" in capsys.readouterr().err


def test_build_counts_go_to_the_active_mlflow_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from visor_lightning.data.report import log_counts_to_mlflow, manifest_counts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        total, items = easy_vqa_items("test")
        m = build_shards(items, tmp_path / "s", "test", total=total, max_samples=5, progress=False)
        assert not log_counts_to_mlflow("data/test", manifest_counts(m))  # no run active: nothing is created
        mlflow.set_experiment("data-counts")  # an experiment of this store (an earlier pipeline set another store's)
        with mlflow.start_run() as run:
            assert log_counts_to_mlflow("data/test", manifest_counts(m))
        got = MlflowClient(uri).get_run(run.info.run_id).data.metrics
        assert got["data/test/written"] == 5 and got["data/test/input"] == 5
    finally:
        mlflow.set_tracking_uri(None)


def test_multi_turn_groups_questions_about_one_image(tmp_path):
    import easy_vqa

    total, items = easy_vqa_items("test", turns=3)
    m = build_shards(items, tmp_path, "mt", total=total, shard_size=50, max_samples=40, progress=False)
    qs, answers, image_ids = easy_vqa.get_test_questions()
    got = list(read_samples(split_urls(tmp_path, "mt"), SkipStats()))
    assert len(got) == m["written"] == 40
    for ex in got:
        turns = ex.conv.turns
        assert 2 <= len(turns) <= 6 and turns[0][1].startswith("<image>\n")
        first = int(ex.conv.id.rsplit("-", 1)[1])
        img = image_ids[first]
        pairs = [(turns[i][1].removeprefix("<image>\n"), turns[i + 1][1]) for i in range(0, len(turns), 2)]
        want = {(qs[i], answers[i]) for i in range(len(qs)) if image_ids[i] == img}
        assert set(pairs) <= want  # every turn is a question about this sample's image, with its answer
    cfg = SyntheticConfig(image_size=64, turns=3)
    for i in range(6):
        rec, _ = make_sample(cfg, 0, "train", i)
        humans = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
        assert 2 <= len(humans) <= 3 and len(set(humans)) == len(humans) and humans[0].startswith("<image>\n")


def test_easy_vqa_validation_never_reads_training_images():
    from visor_lightning.data.sources import easy_vqa_part

    assert easy_vqa_part("train") == easy_vqa_part("easy_train") == "train"
    assert easy_vqa_part("easy_val") == easy_vqa_part("test") == easy_vqa_part("val") == "test"
    assert easy_vqa_part("easy_val", "train") == "train"
    _, train = easy_vqa_items("easy_train")
    _, val = easy_vqa_items("easy_val")
    first_train, first_val = next(train).payload["image"], next(val).payload["image"]
    assert "/train/" in first_train and "/test/" in first_val
