"""Plain progress lines for logs that are not a terminal (Slurm job files, CI, ``| tee``).

A Rich bar draws nothing useful into a file, so without this a 4-minute stage shows no line between the model
summary and the end of the epoch. One line every 50 optimizer steps or every 10% of the run, whichever is
fewer, carries the stage, step/total, loss, samples/s, elapsed time and ETA (and, with ``model.compile``, the
compile seconds and recompiles so far); validation ends with one line of its accuracies.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


def default_every(total: int) -> int:
    """Every 50 steps or every 10% of ``total``, whichever prints more often (at least every step)."""
    return max(1, min(50, total // 10))


def clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLines(pl.Callback):
    """Rank zero prints ``[stage] step 50/900 | loss 2.314 | 47.1 samples/s | elapsed 0:00:17 | ETA 0:05:02``."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.t0 = 0.0
        self.samples = 0
        self.start_step = 0
        self.total = self.every = 1
        self.last_printed = -1

    def _print(self, text: str) -> None:
        print(f"[{self.stage}] {text}", flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.start_step = trainer.global_step  # a resumed run counts its rate from here
        self.total = int(trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                         else trainer.estimated_stepping_batches)
        self.every = default_every(self.total)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self.samples += (len(ids) if ids is not None else 0) * trainer.world_size
        step, total = trainer.global_step, self.total
        if not trainer.is_global_zero or step == self.last_printed or step == 0 or (step % self.every and step != total):
            return
        self.last_printed = step
        elapsed = time.perf_counter() - self.t0
        done = max(1, step - self.start_step)
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"loss {float(loss):.4f}" if loss is not None else "loss -"
        eta = elapsed / done * max(0, total - step)
        compiled = ""
        if getattr(getattr(pl_module, "hparams", None), "compile", False):  # model.compile: what it has cost so far
            from visor_lightning.models.compiled import compile_stats, stats_text

            compiled = " | " + stats_text(compile_stats())
        self._print(f"step {step}/{total} | {loss_text} | {self.samples / max(elapsed, 1e-9):.1f} samples/s | "
                    f"elapsed {clock(elapsed)} | ETA {clock(eta)}{compiled}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        accs = {k: float(v) for k, v in trainer.callback_metrics.items() if "/acc/" in k}
        if accs:
            self._print("validation: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(accs.items())))
