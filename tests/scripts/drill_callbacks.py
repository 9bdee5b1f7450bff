"""Callbacks the failure drills add to a real `visor fit` run (``--trainer.callbacks+=drill_callbacks.X``)."""

from __future__ import annotations

import resource
import signal

import lightning.pytorch as pl


class FillDisk(pl.Callback):
    """From global step ``at`` on, any file this process writes may hold 1 KiB at most: the next checkpoint write
    fails in the kernel (EFBIG), as a full disk fails it (ENOSPC)."""

    def __init__(self, at: int = 4) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write returns an error instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
