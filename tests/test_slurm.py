"""`visor submit` against a real single-node Slurm cluster (scripts/slurm/up.sh; .ci/run starts it).

The cluster is started here if it is not up (root and apt are needed, as on CI), and stopped again if this
session started it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.batch_size", "2", "--global_batch_size", "4", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--model.init_args.warmup_steps", "0"]


def _sh(*cmd: str, check: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {done.stderr}")
    return done.stdout


def _cluster_up() -> bool:
    try:
        return "is UP" in _sh("scontrol", "ping", check=False) and "idle" in _sh("sinfo", "-h", "-o", "%t", check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    started = False
    if not _cluster_up():
        done = subprocess.run(["bash", str(ROOT / "scripts/slurm/up.sh")], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"scripts/slurm/up.sh failed:\n{done.stdout}\n{done.stderr}"
        started = True
    yield
    if started:
        subprocess.run(["bash", str(ROOT / "scripts/slurm/down.sh")], capture_output=True, timeout=300)


def _submit(tmp: Path, data: Path, *args: str, fit: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISOR_DATA": str(data), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "visor_lightning", "submit", "--out", str(tmp / "jobs"), *args]
    if fit:
        cmd += ["--", *fit]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _job(done: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    job_dir = Path(done.stdout.split("job directory: ")[1].split()[0])
    return job_id, job_dir


def _state(job_id: str) -> str:
    out = _sh("sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id, check=False).strip()
    return out.split("\n")[0].split()[0] if out else "UNKNOWN"


def _wait(job_id: str, states: set[str], timeout: float) -> str:
    end = time.time() + timeout
    while time.time() < end:
        s = _state(job_id)
        if s in states:
            return s
        time.sleep(0.5)
    _sh("scancel", job_id, check=False)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s (last: {_state(job_id)})")


def _log(job_dir: Path, job_id: str) -> str:
    return (job_dir / "logs" / f"{job_id}.out").read_text()


def test_dry_run_prints_a_quoted_script_and_writes_nothing(demo_data, tmp_path):
    odd = tmp_path / "my cfg's $HOME.yaml"
    odd.write_text((ROOT / "experiments/debug/stage0_base.yaml").read_text())
    done = _submit(tmp_path, demo_data, "--config", str(odd), "--nodes", "2", "--gpus-per-node", "4",
                   "--partition", "gpu", "--time", "04:00:00", "--account", "proj-1", "--job-name", "visor-s1",
                   "--dry-run", fit=["--trainer.max_steps", "7"])
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --account=proj-1",
                 "#SBATCH --job-name=visor-s1", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"):
        assert line + "\n" in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)
    assert argv[argv.index("--trainer.num_nodes") + 1] == "2" and argv[argv.index("--trainer.devices") + 1] == "4"
    assert argv[argv.index("--ckpt_path") + 1] == "last"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    assert "ddp.yaml" in done.stderr  # 8 processes, no strategy in the YAML: the DDP fragment is stacked, and said
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "experiments/debug/nope.yaml"], "--config experiments/debug/nope.yaml: no such file"),
    (["--config", "experiments/debug/stage0_base.yaml", "--nodes", "0"], "--nodes 0: need at least 1 node"),
    (["--config", "experiments/debug/stage0_base.yaml", "--job-name", "x; rm -rf /"], "--job-name"),
    (["--config", "experiments/debug/stage0_base.yaml", "--time", "soon"], "--time 'soon'"),
    (["--config", "experiments/debug/stage0_base.yaml", "--gpus-per-node", "0", "--partition", "nosuch"],
     "--partition nosuch: unknown; this cluster has debug"),
])
def test_bad_arguments_fail_before_anything_is_submitted(slurm_cluster, demo_data, tmp_path, args, message):
    before = _sh("squeue", "-h", "-o", "%i")
    done = _submit(tmp_path, demo_data, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "jobs").exists() and _sh("squeue", "-h", "-o", "%i") == before


def test_a_job_sbatch_refuses_leaves_no_job_directory(slurm_cluster, demo_data, tmp_path):
    """Past the checks visor makes itself, sbatch can still refuse (here: a GPU job on this cluster, which has no
    GPU resource); the job directory with its code snapshot (~1 MB) would only look like a submitted job, so it goes."""
    before = _sh("squeue", "-h", "-o", "%i")
    done = _submit(tmp_path, demo_data, "--config", "experiments/debug/stage0_base.yaml", "--gpus-per-node", "1")
    assert done.returncode == 2 and "sbatch refused the job" in done.stderr and "nothing was queued" in done.stderr, \
        done.stderr
    assert not [p for p in (tmp_path / "jobs").glob("*") if p.is_dir()] and _sh("squeue", "-h", "-o", "%i") == before


def test_a_config_typo_fails_at_submission(slurm_cluster, demo_data, tmp_path):
    done = _submit(tmp_path, demo_data, "--config", "experiments/debug/stage0_base.yaml", "--gpus-per-node", "0",
                   fit=["--model.init_args.lrr", "0.1"])
    assert done.returncode == 2, done.stderr  # named before anything is written, as `visor fit` would name it
    assert "visor submit: error: the command line: unknown key model.init_args.lrr (did you mean model.init_args.lr?)" \
        in done.stderr
    assert not (tmp_path / "jobs").exists()


@pytest.mark.slow
def test_two_task_job_completes_with_metrics_in_mlflow(slurm_cluster, demo_data, tmp_path):
    from mlflow import MlflowClient

    done = _submit(tmp_path, demo_data, "--config", "experiments/debug/stage0_base.yaml", "--gpus-per-node", "0",
                   "--ntasks-per-node", "2", "--job-name", "visor-tiny", "--time", "10",
                   fit=["--trainer.max_steps", "6", "--data.batches_per_epoch", "6", *TINY])
    job_id, job_dir = _job(done)
    assert _wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240) == "COMPLETED", _log(job_dir, job_id)
    log = _log(job_dir, job_id)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert f"[visor] code: {job_dir.resolve()}/code/visor_lightning/__init__.py" in log  # the snapshot ran
    assert (job_dir / "code" / "GIT_COMMIT").is_file() and (job_dir / "config.yaml").is_file()
    run_id = (job_dir / "run" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(6))
    assert json.loads((job_dir / "run" / "weights" / "visor.json").read_text())["global_step"] == 6


def _release(job_id: str) -> None:
    """A requeued job waits ~2 min (Slurm's BeginTime hold); a test does not."""
    _wait(job_id, {"PENDING", "REQUEUED", "RUNNING"}, 60)
    for _ in range(100):
        if _state(job_id) == "RUNNING":
            return
        _sh("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(0.3)


def _checkpoint_step(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.is_file() else -1


@pytest.mark.slow
def test_requeued_job_resumes_in_the_same_mlflow_run(slurm_cluster, demo_data, tmp_path):
    """Twice: the pre-emption signal (Lightning writes hpc_ckpt and requeues itself), then an admin's
    `scontrol requeue` (no warning: resume from checkpoints/last.ckpt). One MLflow run, every step logged."""
    from mlflow import MlflowClient

    steps = 120
    done = _submit(tmp_path, demo_data, "--config", "experiments/debug/stage0_base.yaml", "--gpus-per-node", "0",
                   "--ntasks-per-node", "2", "--job-name", "visor-requeue", "--time", "20",
                   fit=["--trainer.max_steps", str(steps), "--data.batches_per_epoch", str(steps),
                        "--checkpoint_every_n_steps", "10", *TINY])
    job_id, job_dir = _job(done)
    run = job_dir / "run"
    last = run / "checkpoints" / "last.ckpt"

    def wait_for_step(at_least: int) -> None:
        end = time.time() + 240
        while _checkpoint_step(last) < at_least:
            assert time.time() < end and _state(job_id) in {"PENDING", "RUNNING", "REQUEUED"}, _log(job_dir, job_id)
            time.sleep(0.3)

    wait_for_step(10)
    run_id = (run / "mlflow_run_id").read_text().strip()
    _sh("scancel", "--signal=USR1", job_id)  # what --signal=SIGUSR1@90 sends before the time limit
    end = time.time() + 120
    while not list(run.glob("hpc_ckpt_*.ckpt")):
        assert time.time() < end, _log(job_dir, job_id)
        time.sleep(0.3)
    _release(job_id)
    wait_for_step(_checkpoint_step(next(run.glob("hpc_ckpt_*.ckpt"))) + 10)
    _sh("scontrol", "requeue", job_id)
    _release(job_id)
    assert _wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED", _log(job_dir, job_id)

    log = _log(job_dir, job_id)
    assert "(restart 0)" in log and "(restart 1)" in log and "(restart 2)" in log
    assert "resuming from" in log and "hpc_ckpt_1.ckpt" in log
    assert (run / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    logged = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert logged == set(range(steps))  # a continuous step count across both restarts
    assert json.loads((run / "weights" / "visor.json").read_text())["global_step"] == steps
