"""Slurm pre-emption: on SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``), checkpoint at the next batch end on every
rank, then ``scontrol requeue`` the job.

Lightning's own auto-requeue saves the checkpoint *inside* the signal handler. Under DDP a rank can get the signal
while its peer is inside a gradient all-reduce; the handler's checkpoint barrier then pairs with the wrong
collective and the job hangs (seen in this project's requeue test). Here the handler only sets a flag; the ranks
agree on it after a batch (one scalar all-reduce), where no collective is in flight, and save together.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment


def in_slurm_batch_job() -> bool:
    return SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class SlurmPreemption(pl.Callback):
    def __init__(self, root: str | Path, sig: int = signal.SIGUSR1) -> None:
        self.root, self.sig = Path(root), sig
        self.requested = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(self.sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: see the module docstring

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        existing = [int(p.stem.rsplit("_", 1)[1]) for p in self.root.glob("hpc_ckpt_*.ckpt")]
        path = self.root / f"hpc_ckpt_{max(existing, default=0) + 1}.ckpt"
        trainer.save_checkpoint(path)
        self.requested = False
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            if "SLURM_ARRAY_TASK_ID" in os.environ:
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            print(f"[visor] pre-emption signal: saved {path} at step {trainer.global_step}; requeueing job {job}",
                  flush=True)
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode:
                print(f"[visor] scontrol requeue {job} failed: {done.stderr.strip()}; resume by hand with "
                      f"--ckpt_path last", flush=True)
        # Slurm ends the job and queues it again. Stop cleanly meanwhile, marked as pre-empted so that the end of
        # fit writes no final weights (a pipeline would take those for a finished stage).
        trainer.visor_preempted = True
        trainer.should_stop = True
