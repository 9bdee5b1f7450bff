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


class MlflowOutage(pl.Callback):
    """Stops the MLflow server (pid in $DRILL_SERVER_PID) at step ``down``, starts it again ($DRILL_SERVER_CMD,
    new pid written to $DRILL_SERVER_PIDFILE) at step ``up`` and waits until it answers."""

    def __init__(self, down: int = 8, up: int = 20) -> None:
        self.down, self.up = down, up

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import shlex
        import subprocess
        import time
        import urllib.request

        if trainer.global_step == self.down:
            os.killpg(int(os.environ["DRILL_SERVER_PID"]), signal.SIGKILL)
            time.sleep(1.0)
        if trainer.global_step == self.up:
            proc = subprocess.Popen(shlex.split(os.environ["DRILL_SERVER_CMD"]), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            with open(os.environ["DRILL_SERVER_PIDFILE"], "w") as f:
                f.write(str(proc.pid))
            url = os.environ["MLFLOW_TRACKING_URI"] + "/health"
            for _ in range(240):
                try:
                    if urllib.request.urlopen(url, timeout=1).read() == b"OK":
                        return
                except OSError:
                    time.sleep(0.5)
            raise RuntimeError("the MLflow server did not come back")


class NanLossAt(pl.Callback):
    """At global step ``at``, before that step's forward, one weight of the model becomes NaN: that step's loss is
    NaN, at a step the drill chooses (a huge learning rate blows up at whatever step it likes)."""

    def __init__(self, at: int = 5) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if trainer.global_step == self.at:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")
