"""``visor submit``: one stage as a Slurm batch job that survives preemption.

Each submission gets a job directory holding everything the job needs, so later edits to the repository or the
YAML cannot change a queued or requeued job:

    <out>/<job-name>-<time>/
      config.yaml   the resolved stage config (``visor fit ... --print_config``: typos fail here, not in the queue)
      code/         a snapshot of the package as installed (visor_lightning + data/ + callbacks/), put first on
                    PYTHONPATH, plus the git commit and diff it came from
      job.sbatch    the rendered script; logs/<job id>.out (appended across requeues)
      run/          the stage's run directory: checkpoints, ``mlflow_run_id``, weights, eval

Requeue: ``--signal=SIGUSR1@90`` makes ``callbacks/preemption.py`` write ``run/hpc_ckpt_<n>.ckpt`` on every rank
at the next batch end and call ``scontrol requeue``; the restarted job runs ``visor fit --ckpt_path last``, which
resumes from the newest of that and ``checkpoints/last.ckpt`` (so a requeue without the signal, e.g. ``scontrol
requeue`` by an admin or a node failure, resumes too) and logs into the same MLflow run (``run/mlflow_run_id``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from visor_lightning.errors import report
from visor_lightning.lit.tracking import tracking_uri

SAFE = re.compile(r"^[A-Za-z0-9_.:,+=@/-]+$")  # what #SBATCH values may hold (sbatch reads them without a shell)
REPO = Path(__file__).resolve().parents[2]


class SubmitError(ValueError):
    """A bad ``visor submit`` argument, found before anything is submitted."""


@dataclass
class JobSpec:
    configs: list[str]
    nodes: int = 1
    gpus_per_node: int = 1
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "visor"
    out: str = "runs/slurm"
    python: str = sys.executable
    fit_args: list[str] = field(default_factory=list)

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU; on CPU-only nodes ``--ntasks-per-node`` processes (gloo)."""
        return self.ntasks_per_node or max(self.gpus_per_node, 1)


def validate(spec: JobSpec, *, check_cluster: bool) -> None:
    """Everything that can be wrong with the arguments, named, before a file is written or a job queued."""
    if not spec.configs:
        raise SubmitError("--config is required (a stage YAML, e.g. experiments/debug/stage0_base.yaml)")
    for c in spec.configs:
        if not Path(c).is_file():
            raise SubmitError(f"--config {c}: no such file")
    from visor_lightning.config_check import ConfigError, check_stage_args

    try:  # every unknown key of the configs and the `--` arguments at once, before visor fit parses them
        check_stage_args([a for c in spec.configs for a in ("--config", c)] + list(spec.fit_args))
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    if spec.nodes < 1:
        raise SubmitError(f"--nodes {spec.nodes}: need at least 1 node")
    if spec.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node {spec.gpus_per_node}: must be >= 0 (0: CPU tasks over gloo)")
    if spec.ntasks_per_node is not None and spec.ntasks_per_node < 1:
        raise SubmitError(f"--ntasks-per-node {spec.ntasks_per_node}: need at least 1")
    if spec.gpus_per_node and spec.ntasks_per_node not in (None, spec.gpus_per_node):
        raise SubmitError(f"--ntasks-per-node {spec.ntasks_per_node} must equal --gpus-per-node "
                          f"{spec.gpus_per_node}: Lightning runs one process per GPU")
    for flag, value in (("--job-name", spec.job_name), ("--partition", spec.partition), ("--time", spec.time),
                        ("--account", spec.account)):
        if value is not None and not SAFE.match(value):
            raise SubmitError(f"{flag} {value!r}: only letters, digits and _ . : , + = @ / - are allowed")
    if spec.time is not None and not re.match(r"^(\d+-)?\d+(:\d+){0,2}$", spec.time):
        raise SubmitError(f"--time {spec.time!r}: use minutes, [D-]HH:MM[:SS] or MM:SS")
    if check_cluster:
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found: run on a Slurm login node (or use --dry-run to see the script)")
        if spec.partition is not None:
            known = partitions()
            if spec.partition not in known:
                raise SubmitError(f"--partition {spec.partition}: unknown; this cluster has {', '.join(known)}")


def partitions() -> list[str]:
    done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise SubmitError(f"sinfo failed, is the cluster up? {done.stderr.strip()}")
    return [p.strip().rstrip("*") for p in done.stdout.split() if p.strip()]


def resolve_config(spec: JobSpec) -> str:
    """The stage config as ``visor fit`` will see it (interpolations resolved, defaults filled in)."""
    cmd = [spec.python, "-m", "visor_lightning", "fit"]
    for c in spec.configs:
        cmd += ["--config", c]
    done = subprocess.run([*cmd, *spec.fit_args, "--print_config"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        err = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise SubmitError(f"the config does not parse ({' '.join(map(shlex.quote, cmd[3:]))}):\n{err}")
    return done.stdout


def snapshot_code(dest: Path) -> None:
    """The package laid out as installed (data/ and callbacks/ inside it) + experiments/, and where it came from."""
    pkg = dest / "visor_lightning"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "visor_lightning", pkg, ignore=ignore)
    shutil.copytree(REPO / "data", pkg / "data", ignore=ignore)
    shutil.copytree(REPO / "callbacks", pkg / "callbacks", ignore=ignore)
    shutil.copytree(REPO / "experiments", dest / "experiments", ignore=ignore)
    git = ["git", "-C", str(REPO)]
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    (dest / "GIT_COMMIT").write_text(sha.stdout if sha.returncode == 0 else "not a git checkout\n")
    diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True, text=True)
    if diff.returncode == 0 and diff.stdout:
        (dest / "git.diff").write_text(diff.stdout)


def render(spec: JobSpec, job_dir: Path) -> str:
    """The sbatch script. #SBATCH values are validated (no shell reads them); every string in shell lines is
    quoted with ``shlex.quote``."""
    q = shlex.quote
    d = job_dir.resolve()
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={spec.job_name}",
             f"#SBATCH --nodes={spec.nodes}",
             f"#SBATCH --ntasks-per-node={spec.tasks_per_node}"]
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [
        "# Lightning (SLURMEnvironment) checkpoints and requeues the job on SIGUSR1, sent 90 s before the time limit",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={d}/logs/%j.out",
        "set -euo pipefail",
        f"export PYTHONPATH={q(str(d / 'code'))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export MLFLOW_TRACKING_URI={q(tracking_uri(create=False))}",
        "export HF_HUB_OFFLINE=1",
        f"cd {q(str(Path.cwd().resolve()))}  # relative paths in the config; -P keeps this directory off sys.path",
        'echo "[visor] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is)"',
    ]
    lines.append(f"{q(spec.python)} -P -c 'import visor_lightning as v; print(\"[visor] code:\", v.__file__)'")
    fit = [spec.python, "-u", "-P", "-m", "visor_lightning", "fit", "--config", str(d / "config.yaml"),
           "--trainer.num_nodes", str(spec.nodes), "--trainer.devices", str(spec.tasks_per_node),
           "--trainer.default_root_dir", str(d / "run"), "--ckpt_path", "last"]
    if not spec.gpus_per_node:
        fit += ["--trainer.accelerator", "cpu"]
    lines.append("srun " + " ".join(q(a) for a in fit))
    return "\n".join(lines) + "\n"


DDP_FRAGMENT = REPO / "experiments" / "base" / "ddp.yaml"


def with_default_strategy(spec: JobSpec) -> JobSpec:
    """More than one process and no strategy anywhere: stack experiments/base/ddp.yaml (VISOR skips layers, so
    plain DDP would fail on unused parameters), and say so."""
    import yaml

    if spec.nodes * spec.tasks_per_node == 1 or any(a.startswith("--trainer.strategy") for a in spec.fit_args):
        return spec
    for c in spec.configs:
        trainer = (yaml.safe_load(Path(c).read_text()) or {}).get("trainer") or {}
        if trainer.get("strategy") not in (None, "auto"):
            return spec
    print(f"[visor submit] {spec.nodes * spec.tasks_per_node} processes and no trainer.strategy: adding --config "
          f"{DDP_FRAGMENT.relative_to(REPO)} (or stack experiments/base/deepspeed_zero2.yaml)", file=sys.stderr)
    return replace(spec, configs=[*spec.configs, str(DDP_FRAGMENT)])


def prepare(spec: JobSpec, *, dry_run: bool) -> tuple[Path, str]:
    validate(spec, check_cluster=not dry_run)
    spec = with_default_strategy(spec)
    config = resolve_config(spec)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    job_dir = Path(spec.out) / f"{spec.job_name}-{stamp}"
    script = render(spec, job_dir)
    if dry_run:
        return job_dir, script
    n = 1
    while job_dir.exists():  # two submissions in the same second
        n += 1
        job_dir = Path(spec.out) / f"{spec.job_name}-{stamp}-{n}"
        script = render(spec, job_dir)
    (job_dir / "logs").mkdir(parents=True)
    (job_dir / "config.yaml").write_text(config)
    snapshot_code(job_dir / "code")
    (job_dir / "job.sbatch").write_text(script)
    return job_dir, script


def submit(spec: JobSpec, *, dry_run: bool = False) -> tuple[str | None, Path, str]:
    """Render (and unless ``dry_run`` sbatch) the job; returns (job id, job directory, script)."""
    job_dir, script = prepare(spec, dry_run=dry_run)
    if dry_run:
        return None, job_dir, script
    done = subprocess.run(["sbatch", "--parsable", str(job_dir / "job.sbatch")], capture_output=True, text=True,
                          timeout=60)
    if done.returncode:  # nothing was queued: the job directory (code snapshot, script) would only mislead
        shutil.rmtree(job_dir, ignore_errors=True)
        raise SubmitError(f"sbatch refused the job: {done.stderr.strip()} (nothing was queued; {job_dir} removed)")
    job_id = done.stdout.strip().split(";")[0]
    (job_dir / "JOB_ID").write_text(job_id + "\n")
    return job_id, job_dir, script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visor submit",
        description="Submit one stage (a `visor fit` config) as a Slurm job that checkpoints and requeues itself.",
        epilog="Arguments after `--` go to `visor fit`, e.g. -- --trainer.max_steps 1000.")
    p.add_argument("--config", action="append", default=[], help="stage YAML (repeat to stack fragments)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="0: CPU nodes, one gloo process per task")
    p.add_argument("--ntasks-per-node", type=int, default=None, help="processes per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process (default: Slurm's)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    p.add_argument("--account", default=None, help="Slurm account to charge (default: yours)")
    p.add_argument("--job-name", default="visor", help="Slurm job name and job directory prefix (default visor)")
    p.add_argument("--out", default="runs/slurm", help="job directories go here")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    return p


def submit_main(argv: list[str]) -> int:
    from visor_lightning.commands.args import split_passthrough

    argv, fit_args = split_passthrough(argv)
    a = build_parser().parse_args(argv)
    spec = JobSpec(configs=a.config, nodes=a.nodes, gpus_per_node=a.gpus_per_node, ntasks_per_node=a.ntasks_per_node,
                   cpus_per_task=a.cpus_per_task, partition=a.partition, time=a.time, account=a.account,
                   job_name=a.job_name, out=a.out, fit_args=fit_args)
    try:
        job_id, job_dir, script = submit(spec, dry_run=a.dry_run)
    except SubmitError as e:
        return report("submit", e)
    if a.dry_run:
        print(script, end="")
        return 0
    print(f"submitted job {job_id}\n  job directory: {job_dir}\n  log:  tail -f {job_dir}/logs/{job_id}.out\n"
          f"  queue: squeue -j {job_id}    accounting: sacct -j {job_id}\n"
          f"  MLflow: {tracking_uri()} (run id in {job_dir}/run/mlflow_run_id once the job starts)")
    return 0
