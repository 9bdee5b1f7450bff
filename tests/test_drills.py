"""Failure drills: nothing is lost and every error says what to do.

Real runs of `visor fit` (subprocesses, tiny stage): a NaN loss, a checkpoint write that fails mid-training, damaged
checkpoints and weights, an MLflow server that is not there, and config typos."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "experiments/debug/stage2_full.yaml"


def _fit(tiny_pipeline, tmp_path, *extra: str, env_extra: dict | None = None, steps: int = 8) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests" / "scripts"), **(env_extra or {})}
    args = [sys.executable, "-m", "visor_lightning", "fit", "--config", str(STAGE),
            "--model.init_args.init_from", str(tiny_pipeline["out"] / "ca_pretrain" / "weights"),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", str(steps),
            "--data.batches_per_epoch", str(steps), "--data.batch_size", "2", "--global_batch_size", "2",
            "--data.num_workers", "0", "--checkpoint_every_n_steps", "2", "--trainer.log_every_n_steps", "1", *extra]
    # its own session: the kill drill (callbacks/drills.py) SIGKILLs the run's whole process group
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, start_new_session=True)


def _ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("at", [5, 1])
def test_nan_loss_stops_at_that_step_naming_samples_and_checkpoint(tiny_pipeline, tmp_path, at):
    """A NaN loss at step 5 (checkpoints every 2 steps: step 4's is the last good one) and at step 1 (none yet)."""
    drill = json.dumps({"class_path": "drill_callbacks.NanLossAt", "init_args": {"at": at}})
    done = _fit(tiny_pipeline, tmp_path, f"--trainer.callbacks+={drill}", steps=8)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr
    assert f"visor fit: error: train loss is nan at global step {at} (rank 0; batch sample ids: " in err, err[-3000:]
    assert "resume with --ckpt_path last" in err
    ids = err.split("batch sample ids: ")[1].split(")")[0].split(", ")
    assert len(ids) == 2 and all(i and i != "unknown" for i in ids)
    ckpts = tmp_path / "run" / "checkpoints"
    if at == 1:
        assert "no checkpoint written yet" in err and "last good checkpoint" not in err
    else:  # named, and it holds step 4's finite weights, from before the NaN
        named = Path(err.split("last good checkpoint: ")[1].split(". ")[0])
        assert named.parent == ckpts and named.is_file()
        state = torch.load(named, map_location="cpu", weights_only=True)
        assert state["global_step"] == 4
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "weights").exists()  # a failed stage hands nothing over


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_one_and_resume_finishes(tiny_pipeline, tmp_path):
    done = _fit(tiny_pipeline, tmp_path, "--trainer.callbacks+=drill_callbacks.FillDisk",
                "--trainer.callbacks.init_args.at", "4")
    assert done.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"writing checkpoint {ckpts / 'step=4.ckpt'} failed (File too large); earlier checkpoints are untouched" \
        in done.stderr and "resume with --ckpt_path last" in done.stderr, done.stderr[-3000:]
    assert _ckpt_step(ckpts / "last.ckpt") == 2  # the step-2 checkpoint survived the failed step-4 write
    assert not [p for p in ckpts.iterdir() if ".tmp" in p.name]  # no partial file left behind
    resumed = _fit(tiny_pipeline, tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and json.loads((tmp_path / "run" / "weights" / "visor.json").read_text())["global_step"] == 8


def test_damaged_checkpoints_and_weights_are_refused(tiny_pipeline, tmp_path):
    import shutil

    from visor_lightning.lit.cli import latest_checkpoint
    from visor_lightning.lit.weights import load_weights, weights_dir

    # weights: a truncated safetensors file is refused by name, nothing half-loaded
    w = tmp_path / "weights"
    shutil.copytree(tiny_pipeline["out"] / "ca_pretrain" / "weights", w)
    data = (w / "model.safetensors").read_bytes()
    (w / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or not a safetensors file"):
        load_weights(w)
    # a pickle that is not a checkpoint is refused without being unpickled (weights_only)
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": argparse.Namespace(a=1)}, evil)  # an arbitrary global: refused by weights_only
    with pytest.raises(ValueError, match="is not a readable Lightning checkpoint"):
        weights_dir(evil)
    # resume: a truncated newest checkpoint is skipped for the next valid one; all damaged is an error
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = run / "checkpoints" / "step=2.ckpt"
    torch.save({"global_step": 2, "state_dict": {}}, good)
    bad = run / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 4, "state_dict": {"w": torch.zeros(1000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    os.utime(good, (1, 1))  # the damaged one is the newest
    assert latest_checkpoint(run) == str(good)
    good.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        latest_checkpoint(run)


def test_unreachable_mlflow_server_fails_before_training(tiny_pipeline, tmp_path):
    with socket.socket() as s:  # a free loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _fit(tiny_pipeline, tmp_path, env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert done.returncode == 2
    assert f"the MLflow server at MLFLOW_TRACKING_URI=http://127.0.0.1:{port} does not answer" in done.stderr
    assert "--mlflow false" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and "Trainable params" not in done.stdout  # nothing ran


@pytest.mark.parametrize("extra, expected", [
    (["--model.init_args.lrr", "0.1"],
     "visor fit: error: the command line: unknown key model.init_args.lrr (did you mean model.init_args.lr?)"),
    (["--model.init_args.lr", "fast"], "visor fit: error: key 'lr' ("),                         # wrong type
    (["--config", "experiments/debug/nope.yaml"], "visor fit: error: config file {root}/experiments/debug/nope.yaml not found"),
    (["--config", "{tmp}/typo.yaml"],                                                           # a typo in a file
     "visor fit: error: {tmp}/typo.yaml line 3: unknown key model.init_args.lrr (did you mean model.init_args.lr?)"),
])
def test_config_typos_name_the_key_before_any_model_is_built(tiny_pipeline, tmp_path, extra, expected):
    (tmp_path / "typo.yaml").write_text("model:\n  init_args:\n    lrr: 0.1\n")
    fill = lambda s: s.format(tmp=tmp_path, root=ROOT)  # noqa: E731
    done = _fit(tiny_pipeline, tmp_path, *map(fill, extra))
    assert done.returncode == 2 and fill(expected) in done.stderr, done.stderr[-2000:]
    assert "Trainable params" not in done.stdout and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_mlflow_server_outage_mid_run_loses_no_metric(tiny_pipeline, tmp_path):
    """A real `mlflow server` is killed at step 8 and started again at step 20 (same store): training goes on, the
    gap is reported, and the run ends with every step's loss and FINISHED."""
    import shlex
    import signal
    import time
    import urllib.request

    from mlflow import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"sqlite:///{tmp_path / 'server.db'}"
    cmd = f"{sys.executable} -m visor_lightning ui --port {port} --store {store}"
    first = subprocess.Popen(shlex.split(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pidfile = tmp_path / "server.pid"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        done = _fit(tiny_pipeline, tmp_path, "--trainer.callbacks+=drill_callbacks.MlflowOutage",
                    "--trainer.callbacks.init_args.down", "8", "--trainer.callbacks.init_args.up", "20", steps=30,
                    env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "DRILL_SERVER_PID": str(first.pid),
                               "DRILL_SERVER_CMD": cmd, "DRILL_SERVER_PIDFILE": str(pidfile)})
        assert done.returncode == 0, done.stderr[-3000:]
        # Lightning logs a step's metrics under the step index before it: the outage starts at 7 or 8
        down = re.search(r"stopped answering at step (\d+)", done.stdout)
        assert down and 6 <= int(down.group(1)) <= 8, done.stdout[-2000:]
        assert f"the server is back: metrics of steps {down.group(1)}.." in done.stdout
    finally:
        for pid in [first.pid] + ([int(pidfile.read_text())] if pidfile.is_file() else []):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    client = MlflowClient(store)  # the store itself, read after the server is gone
    run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_gaps"].startswith(f"steps {down.group(1)}..")
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(steps[0], steps[-1] + 1)) and steps[0] <= 1 and steps[-1] >= 28, steps
    assert not (tmp_path / "run" / "mlflow_unsent.jsonl").exists()


def test_metrics_kept_while_the_server_is_down_are_written_and_synced(tmp_path, monkeypatch):
    """The server never comes back before the end: the logger writes what it kept to mlflow_unsent.jsonl, and
    `visor mlflow-sync` sends it into the run once a store answers."""
    from mlflow import MlflowClient

    from visor_lightning.cli import main
    from visor_lightning.lit.tracking import resilient_logger_class

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = resilient_logger_class()(experiment_name="x", tracking_uri=f"http://127.0.0.1:{port}", root=tmp_path)
    logger.retry_s = 0.1
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.finalize("success")
    lines = (tmp_path / "mlflow_unsent.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    (tmp_path / "mlflow_run_id").write_text(run.info.run_id)
    assert main(["mlflow-sync", str(tmp_path)]) == 0
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, round(m.value, 3)) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert not (tmp_path / "mlflow_unsent.jsonl").exists() and (tmp_path / "mlflow_unsent.jsonl.sent").exists()
    assert main(["mlflow-sync", str(tmp_path)]) == 2  # nothing left: a clear error, not a silent no-op


@pytest.mark.parametrize("extra, expected", [
    (["--global_batch_size", "3"], "visor fit: error: global_batch_size 3 is not a multiple of batch_size 2"),
    (["--model.init_args.init_from", "{tmp}/nope"], "visor fit: error: init_from='{tmp}/nope' does not exist"),
])
def test_user_errors_are_one_line_and_the_traceback_is_on_request(tiny_pipeline, tmp_path, extra, expected):
    """Errors a user fixes by changing an argument: exit 2 with one line naming it, no traceback (it was 20 to 83
    lines); VISOR_TRACEBACK=1 brings the traceback back for a bug report."""
    fill = lambda s: s.format(tmp=tmp_path)  # noqa: E731
    done = _fit(tiny_pipeline, tmp_path, *map(fill, extra))
    assert done.returncode == 2 and fill(expected) in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 6, done.stderr[-3000:]
    loud = _fit(tiny_pipeline, tmp_path, *map(fill, extra), env_extra={"VISOR_TRACEBACK": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.slow
def test_a_run_killed_and_resumed_with_other_settings_keeps_writing_last_ckpt(tiny_pipeline, tmp_path):
    """SIGKILL (the shipped drill, every rank) right after step 2's checkpoint; resumed with another checkpoint
    interval, as a requeue with edited settings would be. Lightning then no longer recognised its own last.ckpt and
    wrote a new one beside it, last-v1.ckpt (a second 11 GB full state at 0.5B per resume: it filled the disk of
    `visor realsize`). last.ckpt is now overwritten in place (the writes are atomic)."""
    killed = _fit(tiny_pipeline, tmp_path, "--trainer.callbacks+=visor_lightning.callbacks.drills.KillAfterStep",
                  "--trainer.callbacks.init_args.step", "2", steps=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert _ckpt_step(ckpts / "last.ckpt") == 2
    resumed = _fit(tiny_pipeline, tmp_path, "--ckpt_path", "last", "--checkpoint_every_n_steps", "4", steps=6)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert not list(ckpts.glob("last-v*.ckpt"))  # (step=2.ckpt stays: the new interval's top-k does not know it)
    assert _ckpt_step(ckpts / "last.ckpt") == 4  # the newest save (Lightning saves no extra one at the end)
    assert json.loads((tmp_path / "run" / "weights" / "visor.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_a_finished_run_resumed_with_a_larger_max_steps_trains_on(tiny_pipeline, tmp_path):
    """A finished 2-step run (one epoch of 2 batches) resumed with max_steps 4 trained 0 steps and exited 0: it had
    done its max_epochs. max_epochs is now raised to what max_steps needs, and says so."""
    first = _fit(tiny_pipeline, tmp_path, steps=2)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _fit(tiny_pipeline, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "4", steps=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trainer.max_epochs 1 -> 2" in resumed.stdout and "resuming from" in resumed.stdout
    assert json.loads((tmp_path / "run" / "weights" / "visor.json").read_text())["global_step"] == 4
