"""The vision-dependence controls of `visor eval`: the swapped-image copy of each set and the question-only
baseline."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from visor_lightning.controls import question_only_baseline, read_qa
from visor_lightning.data.schema import SkipStats
from visor_lightning.data.images import image_fingerprint as _fingerprint
from visor_lightning.data.streams import read_samples, swap_images
from visor_lightning.commands.evaluate import run_eval

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments/debug/stage4_policy.yaml"


def _examples(shards):
    return list(read_samples(shards.easy_urls, SkipStats()))


def test_swap_moves_every_image_and_keeps_questions(shards):
    real = _examples(shards)
    assert len(real) == 60
    # easy-vqa asks several questions about one image in a row: the control must still move each image
    assert any(_fingerprint(a.image) == _fingerprint(b.image) for a, b in itertools.pairwise(real))
    swapped = list(swap_images(iter(real)))
    assert [e.key for e in swapped] == [e.key for e in real]
    assert [e.conv for e in swapped] == [e.conv for e in real]
    moved = [_fingerprint(a.image) != _fingerprint(b.image) for a, b in zip(real, swapped)]
    assert all(moved)
    assert {_fingerprint(e.image) for e in swapped} <= {_fingerprint(e.image) for e in real}  # images of the set
    assert list(swap_images(iter(real))) == swapped  # deterministic for a fixed order


def test_swap_refuses_a_stream_of_one_image(shards):
    one = _examples(shards)[:1]
    with pytest.raises(ValueError, match="share one image"):
        list(swap_images(iter(one * 3)))


def test_question_only_baseline_by_hand():
    train = [("is it red?", "yes"), ("is it red?", "yes"), ("is it red?", "no"), ("what shape?", "circle"),
             ("what shape?", "square")]
    evaluated = [("is it red?", "yes"), ("is it red?", "no"), ("what shape?", "circle"), ("new question?", "yes")]
    b = question_only_baseline(evaluated, train, reference_name="train")
    # majority: "is it red?" -> yes (1 of 2 right); "what shape?" -> circle (first of a tie, right); unseen -> the
    # overall majority "yes" (right)
    assert b["acc"] == pytest.approx(3 / 4)
    assert b["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2 + 1 / 4) / 4)  # yes, no, circle, square overall
    assert b["unseen_questions"] == 1 and b["questions"] == 3 and b["counted_on"] == "train"
    own = question_only_baseline(evaluated)
    assert own["counted_on"].startswith("the evaluated set itself") and own["acc"] == pytest.approx(3 / 4)


def test_read_qa_reads_the_shards(shards):
    pairs = list(read_qa(shards.easy_urls))
    assert pairs == [(e.conv.question, e.conv.answer) for e in _examples(shards)]
    assert all("<image>" not in q for q, _ in pairs)


def _blind(weights: Path, out: Path) -> Path:
    """A copy of ``weights`` whose connector outputs zeros: every visual token is the same for every image."""
    from visor_lightning.lit.weights import load_weights, save_weights

    model = load_weights(weights)
    with torch.no_grad():
        for name, p in model.connector.named_parameters():
            p.zero_()
    save_weights(model, out)
    return out


def test_eval_reports_swapped_accuracy_and_the_baseline(tiny_pipeline, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    data = tiny_pipeline["data"]
    monkeypatch.setenv("VISOR_DATA", str(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline["uri"])
    weights = tiny_pipeline["out"] / "policy" / "weights"
    blind = _blind(weights, tmp_path / "blind")
    doc = run_eval([str(CONFIG)], str(blind), out=str(tmp_path / "eval"), extra=["--data.num_workers", "0"],
                   baseline_train={"easy": str(data / "easy_train-manifest.json")})
    real = {(r["set"], r["target"], r["id"]): r for r in doc["samples"] if not r["swapped"]}
    swapped = {(r["set"], r["target"], r["id"]): r for r in doc["samples"] if r["swapped"]}
    assert real.keys() == swapped.keys() and len(real) == 2 * 16 * 5  # 2 sets x 16 samples x (4 configs + policy)
    for k, r in real.items():  # every swapped pass received another image; a model that cannot see answers the same
        assert swapped[k]["image"] != r["image"], k
        assert swapped[k]["prediction"] == r["prediction"], k
    # (a seeing model loses accuracy under the swap: tests/test_demo_findings.py checks every trained demo row)
    for s, per in doc["results"].items():
        for t, r in per.items():
            assert r["acc_swapped"] == pytest.approx(r["acc"]) and r["samples"] == 16
    b = doc["baselines"]
    assert b["easy"]["counted_on"].endswith("easy_train-manifest.json") and b["easy"]["samples"] == 16
    # by default the config's data.train (both training splits), not the evaluated set
    assert b["hard"]["counted_on"] == f"{data / 'easy_train-manifest.json'}, {data / 'hard_train-manifest.json'}"
    assert "warning" not in b["hard"] and "WARNING" not in doc["table"]
    assert "swapped images %" in doc["table"] and "Question-only baseline on hard" in doc["table"]
    client = MlflowClient(tiny_pipeline["uri"])
    hist = client.get_metric_history(doc["mlflow_run_id"], "eval/easy/acc_swapped/sa_0")
    assert hist and hist[-1].value == pytest.approx(doc["results"]["easy"]["sa[0]"]["acc_swapped"])
    hist = client.get_metric_history(doc["mlflow_run_id"], "eval/hard/question_only_acc")
    assert hist and hist[-1].value == pytest.approx(b["hard"]["acc"])


def test_baseline_warns_when_its_split_never_saw_the_questions(demo_data):
    """A wrong --baseline-train (another task's split) printed a low number with no warning; the evaluated set itself
    prints an optimistic one. Both now warn, in the JSON and in the table."""
    from visor_lightning.commands.evaluate import baseline_for, markdown
    from visor_lightning.controls import read_qa

    hard = list(read_qa(str(demo_data / "hard_dev-manifest.json")))
    records = [{"set": "hard", "target": "sa[0]", "swapped": False, "question": q, "answer": a} for q, a in hard]
    right = baseline_for("hard", records, str(demo_data / "hard_train-manifest.json"))
    wrong = baseline_for("hard", records, {"hard": str(demo_data / "easy_train-manifest.json")})
    itself = baseline_for("hard", records, None)
    assert "warning" not in right and right["unseen_questions"] <= len(hard) // 2
    assert wrong["unseen_questions"] == len(hard) and f"{len(hard)} of {len(hard)} evaluated questions" in wrong["warning"]
    assert "optimistic" in itself["warning"]
    table = markdown({"hard": {}}, {"hard": 1.0}, {"hard": wrong})
    assert "WARNING: question-only baseline on hard" in table
