"""lmms-eval itself (the ``eval`` extra, installed by ``make install``), run as a user types it, offline:
``lmms-eval --model visor --model_args ... --tasks visor_demo_easy --include_path experiments/lmms_eval`` over the
demo's evaluation set exported with ``visor data export-hf``. Its accuracy equals ``visor eval``'s on the same
samples, and every sample's prefill FLOPs are in its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmms_eval  # noqa: F401  # the extra is part of the README's test install: missing it is a failure
import pytest

from visor_lightning.cli import main
from visor_lightning.commands.evaluate import run_eval

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lmms_eval_cli_equals_visor_eval(tiny_pipeline, tmp_path):
    import shutil

    out, data = tiny_pipeline["out"], tiny_pipeline["data"]
    # the repository's layout (experiments/lmms_eval beside runs/lmms_data) in a copy, and lmms-eval run from a third
    # directory: the tasks find their data from any working directory (they failed outside the repository root)
    repo, work = tmp_path / "repo", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "experiments/lmms_eval", repo / "experiments/lmms_eval")
    work.mkdir()
    for fam in ("easy", "hard"):
        assert main(["data", "export-hf", "--dir", str(data), "--split", f"{fam}_test",
                     "--out", str(repo / "runs/lmms_data" / f"{fam}_test")]) == 0
    weights, target = out / "universal" / "weights", "sa[0,3]"
    lmms = Path(sys.executable).with_name("lmms-eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([str(lmms), "--model", "visor", "--model_args",
                           f"weights={weights},processor={out / 'base' / 'hf'},target={target}",
                           "--tasks", "visor_demo_easy,visor_demo_hard", "--batch_size", "8",
                           "--include_path", str(repo / "experiments/lmms_eval"), "--output_path", str(work / "out"),
                           "--log_samples"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    results = sorted((work / "out").rglob("*_results.json"))
    assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(results[-1].read_text())["results"]

    env_keys = {"VISOR_DATA": str(data), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    try:
        ours = run_eval([str(out / "universal" / "config.yaml")], str(weights), targets=target,
                        out=str(tmp_path / "visor_eval"), swap=False,
                        extra=["--data.val", json.dumps({f: str(data / f"{f}_test-manifest.json") for f in ("easy", "hard")})])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    for fam in ("easy", "hard"):
        task = got[f"visor_demo_{fam}"]
        assert task["exact_match,none"] == pytest.approx(ours["results"][fam][target]["acc"], abs=1e-9)
        assert task["prefill_gflops,none"] == pytest.approx(ours["results"][fam][target]["gflops"], rel=1e-6)
        samples = [json.loads(line) for f in (work / "out").rglob(f"*_samples_visor_demo_{fam}.jsonl")
                   for line in f.read_text().splitlines()]
        mine = [r for r in ours["samples"] if r["set"] == fam]
        assert len(samples) == len(mine) == 16
        assert sorted(s["prefill_gflops"] for s in samples) == pytest.approx(sorted(r["gflops"] for r in mine), rel=1e-6)
