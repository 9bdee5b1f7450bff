"""Browsing experiments: `visor ui` serves the store a tiny pipeline just wrote on 127.0.0.1, and a real headless
Chromium (Debian's, installed here when missing) shows the pipeline run, its stage runs, their metrics and the
accuracy-vs-FLOPs plot. The screenshots are kept under runs/test-artifacts/."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "runs" / "test-artifacts"


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:  # Debian's package (about 10 s): the test set-up installs it, as .ci/run's machine has none
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(cmd, env=env, capture_output=True, check=True)
        exe = shutil.which("chromium")
    assert exe, "chromium could not be installed"
    return exe


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _page(chromium: str, url: str, shot: Path | None = None) -> tuple[str, str]:
    """The page after its scripts ran: (visible text, html); with ``shot``, a screenshot too."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--virtual-time-budget=15000"]
    html = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if shot is not None:
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    return text, html


@pytest.mark.slow
def test_mlflow_ui_shows_the_pipeline_in_a_real_browser(tiny_pipeline, chromium):
    from conftest import visor_ui

    with visor_ui([sys.executable, "-m", "visor_lightning", "ui", "--store", tiny_pipeline["uri"]]) as base:
        port = int(base.rsplit(":", 1)[1])
        # it listens on the loopback interface only
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local and all(a == f"127.0.0.1:{port}" for a in local), listening
        exp = next(e for e in _post(base, "/api/2.0/mlflow/experiments/search", {"max_results": 50})["experiments"]
                   if e["name"] == "visor-test")
        runs = {r["info"]["run_name"].removeprefix("visor-test-").rsplit("-", 1)[0]: r["info"]["run_id"]
                for r in _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]}
        parent, policy = runs["pipeline"], runs["policy"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        eid = exp["experiment_id"]

        text, _ = _page(chromium, f"{base}/#/experiments/{eid}/runs/{parent}", ARTIFACTS / "mlflow_pipeline_run.png")
        assert re.search(r"visor-test-pipeline-[0-9a-f]{7}", text) and "Finished" in text
        child = text.split("Child runs", 1)[1][:600]
        for stage in ("base", "ca_pretrain", "full_finetune", "universal", "policy", "policy_budget"):
            assert re.search(rf"visor-test-{stage}-[0-9a-f]{{7}}", child), (stage, child)
        assert "summary/easy/acc/dense" in text and "summary/hard/acc/fastv_k_1_r_" in text

        text, _ = _page(chromium, f"{base}/#/experiments/{eid}/runs/{policy}", ARTIFACTS / "mlflow_policy_run.png")
        assert "val/easy/acc/policy" in text and "train/loss" in text and "stage : policy" in text

        _, html = _page(chromium, f"{base}/#/experiments/{eid}/runs/{parent}/artifacts/plots/summary_acc_vs_flops.png",
                        ARTIFACTS / "mlflow_pipeline_plot.png")
        assert re.search(r'<img alt="plots/summary_acc_vs_flops.png" src="blob:', html)  # the PNG was fetched and shown
        for png in ("mlflow_pipeline_run.png", "mlflow_policy_run.png", "mlflow_pipeline_plot.png"):
            assert (ARTIFACTS / png).stat().st_size > 20_000


def test_ui_on_a_taken_port_fails_and_says_so(tmp_path):
    """mlflow's server exits 0 when its port is taken; `visor ui` checks first and exits 2 naming the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "visor_lightning", "ui", "--port", str(port), "--store",
                               f"sqlite:///{tmp_path / 'mlflow.db'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port {port} on 127.0.0.1 is taken" in done.stderr and "--port" in done.stderr
