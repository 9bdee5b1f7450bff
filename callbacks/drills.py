"""Failure drills that ship with the package, for checks run outside the tests (`visor realsize`)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class KillAfterStep(pl.Callback):
    """SIGKILL the run's whole process group (every rank) when step ``step + 1`` is about to start: a hard
    interruption right after step ``step``'s checkpoint was written (ModelCheckpoint saves at the end of a batch).
    What `--ckpt_path last` must then recover from."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)
