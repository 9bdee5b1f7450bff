"""Reports what the data pipeline skipped, converted and read, summed over ranks, into the trainer's logger
(MLflow in this project) and stdout, so a bad shard never goes unnoticed."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from visor_lightning.data.schema import REASONS, SkipStats


class DataStats(pl.Callback):
    """At the end of every training and validation epoch: ``data/<name>`` metrics from
    ``trainer.datamodule.skip_counts()``; cumulative since the start of the run (a resampled training stream
    meets the same bad sample again, and counts it again)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def _report(self, trainer: pl.Trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skip_counts"):
            return
        counts = dm.skip_counts()["total"]
        vec = torch.tensor([float(counts.get(n, 0)) for n in SkipStats.NAMES], dtype=torch.float64)
        vec = trainer.strategy.reduce(vec, reduce_op="sum")  # every rank calls this at the same point
        metrics = {f"data/{n}": v for n, v in zip(SkipStats.NAMES, vec.tolist()) if v}
        self.last = metrics
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        skipped = {k.removeprefix("data/"): int(v) for k, v in metrics.items() if k.removeprefix("data/") in REASONS}
        if skipped:
            rank_zero_info(f"data: skipped so far (all ranks): {skipped}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer)
