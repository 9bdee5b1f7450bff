"""`visor eval` on a tiny checkpoint: its numbers equal a reference computed here sample by sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from visor_lightning.data.datamodule import VisorDataModule
from visor_lightning.commands.evaluate import run_eval
from visor_lightning.flops import FlopsModel
from visor_lightning.lit.metrics import normalize_answer
from visor_lightning.lit.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments/debug/stage4_policy.yaml"


def _reference(weights: Path, data: Path) -> dict[tuple[str, str, str], dict]:
    """Every fixed configuration on every validation sample: generate, exact match, analytic prefill FLOPs."""
    from omegaconf import OmegaConf

    new_tokens = OmegaConf.load(CONFIG).model.init_args.max_new_tokens  # what visor eval generates
    model = load_weights(weights).eval()
    fm = FlopsModel(model.backbone, model.schedule, json.loads((weights / "visor.json").read_text())["policy_width"])
    dm = VisorDataModule(val={"easy": str(data / "easy_dev-manifest.json"), "hard": str(data / "hard_dev-manifest.json")},
                         tokenizer=str(data / "tokenizer"), batch_size=4, eval_batch_size=5, num_workers=0)
    dm.backbone = model.backbone
    dm.setup("validate")
    tok = dm.encoder.tok
    out = {}
    for name, loader in zip(["easy", "hard"], dm.val_dataloader()):
        for batch in loader:
            vis = batch["prompt_ids"] == model.image_token_id
            nt = ((~vis) & batch["prompt_mask"].bool()).sum(1).tolist()
            nv = vis.sum(1).tolist()
            for c, config in enumerate(model.schedule.names):
                ids = torch.full((len(nt),), c)
                with torch.no_grad():
                    tokens, _ = model.generate(batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"],
                                               batch["prompt_mask"], max_new_tokens=new_tokens, config_ids=ids,
                                               eos_token_id=tok.eos_token_id)
                for i, pred in enumerate(tok.batch_decode(tokens, skip_special_tokens=True)):
                    out[(name, config, batch["id"][i])] = {
                        "prediction": pred, "correct": normalize_answer(pred) == normalize_answer(batch["answer"][i]),
                        "gflops": fm.prefill(model.schedule.feasible[c], nt[i], nv[i], routed=False) / 1e9,
                        "dense_gflops": fm.prefill(None, nt[i], nv[i]) / 1e9,
                    }
    return out


def test_eval_equals_a_reference_computed_by_hand(tiny_pipeline, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    data, weights = tiny_pipeline["data"], tiny_pipeline["out"] / "policy" / "weights"
    monkeypatch.setenv("VISOR_DATA", str(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline["uri"])
    doc = run_eval([str(CONFIG)], str(weights), out=str(tmp_path), extra=["--data.num_workers", "0"])
    ref = _reference(weights, data)

    got = {(r["set"], r["target"], r["id"]): r for r in doc["samples"] if r["target"] != "policy" and not r["swapped"]}
    assert got.keys() == ref.keys() and len(ref) == 2 * 16 * 4  # 2 sets x 16 samples x 4 configurations
    for k, r in ref.items():
        assert got[k]["prediction"] == r["prediction"] and got[k]["correct"] == r["correct"], k  # the answer itself
        assert abs(got[k]["gflops"] - r["gflops"]) < 1e-9 and abs(got[k]["dense_gflops"] - r["dense_gflops"]) < 1e-9
    for (s, t, _), _r in ref.items():
        rows = [v for (s2, t2, _), v in ref.items() if (s2, t2) == (s, t)]
        res = doc["results"][s][t]
        assert res["samples"] == len(rows) == 16
        assert abs(res["acc"] - sum(v["correct"] for v in rows) / len(rows)) < 1e-9
        mean = sum(v["gflops"] for v in rows) / len(rows)
        assert abs(res["gflops"] - mean) < 1e-6
        assert abs(res["saving"] - sum(v["dense_gflops"] for v in rows) / sum(v["gflops"] for v in rows)) < 1e-6
    # the policy row: each sample priced at the configuration the policy chose for it (router MLP included)
    policy = [r for r in doc["samples"] if r["target"] == "policy" and not r["swapped"]]
    assert len(policy) == 32
    for r in policy:  # a KeyError here would mean the policy chose a configuration that is not feasible
        assert r["gflops"] > ref[(r["set"], r["config"], r["id"])]["gflops"]  # + the policy MLP
    # table, JSON and the training run in MLflow (found beside the checkpoint) hold the same numbers
    assert (tmp_path / "eval.md").read_text().count("| easy |") == 1 + 4 + 1
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == doc["results"]
    run_id = (weights.parent / "mlflow_run_id").read_text().strip()
    assert doc["mlflow_run_id"] == run_id
    history = MlflowClient(tiny_pipeline["uri"]).get_metric_history(run_id, "eval/hard/acc/sa_0")
    assert history and abs(history[-1].value - doc["results"]["hard"]["sa[0]"]["acc"]) < 1e-9


def test_eval_errors_name_the_problem(tiny_pipeline, tmp_path):
    env_args = [sys.executable, "-m", "visor_lightning", "eval", "--config", str(CONFIG)]
    done = subprocess.run([*env_args, "--ckpt", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ckpt" in done.stderr and "no such file" in done.stderr
    weights = tiny_pipeline["out"] / "policy" / "weights"
    done = subprocess.run([*env_args, "--ckpt", str(weights), "--configs", "sa[9]", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VISOR_DATA": str(tiny_pipeline["data"])})
    assert done.returncode == 2 and "sa[9]" in done.stderr and "not feasible" in done.stderr, done.stderr


def test_eval_mlflow_false_logs_nothing(tiny_pipeline, tmp_path):
    """`visor eval --mlflow false`: the table and eval.json as always, and not one new run or metric in the store."""
    import os

    from mlflow import MlflowClient

    client = MlflowClient(tiny_pipeline["uri"])
    weights = tiny_pipeline["out"] / "policy" / "weights"
    trained_in = (weights.parent / "mlflow_run_id").read_text().strip()  # where eval would log by default

    def snapshot():  # every run's id, and how many values each metric of the training run holds
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        keys = client.get_run(trained_in).data.metrics
        return sorted(r.info.run_id for r in runs), {k: len(client.get_metric_history(trained_in, k)) for k in keys}
    before = snapshot()
    env = {**os.environ, "VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    done = subprocess.run([sys.executable, "-m", "visor_lightning", "eval", "--config", str(CONFIG), "--ckpt", str(weights),
                           "--configs", "sa[0]", "--no-swap", "--mlflow", "false", "--out", str(tmp_path), "--",
                           "--data.num_workers", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing logged to MLflow (--mlflow false)" in done.stdout and (tmp_path / "eval.json").is_file()
    assert snapshot() == before
