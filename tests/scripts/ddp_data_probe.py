"""Run by tests/test_data_stream.py in a subprocess: 2 ranks (gloo, CPU) x 2 workers read the shards through
VisorDataModule under a real Lightning DDP Trainer, and each rank writes what it saw to ``<out>/rank<r>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from visor_lightning.callbacks.data_stats import DataStats
from visor_lightning.data.datamodule import VisorDataModule
from visor_lightning.data.tokenizer import backbone_for_tokenizer, load_tokenizer
from visor_lightning.models import tiny_backbone


class Recorder(pl.LightningModule):
    """A one-parameter model: enough for DDP to all-reduce gradients every step."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.train_ids: list[list[str]] = []
        self.val_ids: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.train_ids.append(list(batch["id"]))
        return (self.w - batch["pixel_values"].mean()) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if self.current_epoch == self.trainer.max_epochs - 1:
            self.val_ids.setdefault(dataloader_idx, []).extend(batch["id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        stats = next(c for c in self.trainer.callbacks if isinstance(c, DataStats))
        rank = self.trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps({
            "train_ids": self.train_ids, "val_ids": self.val_ids, "global_step": self.trainer.global_step,
            "data_stats": stats.last,
        }))


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok = str(root / "tokenizer")
    spec = backbone_for_tokenizer(tiny_backbone(), load_tokenizer(tok))
    dm = VisorDataModule(
        train=[str(root / "easy-manifest.json"), str(root / "hard-manifest.json")],
        val={"easy": str(root / "easy-*.tar"), "hard": str(root / "hard-*.tar")},
        tokenizer=tok, backbone=spec, batch_size=4, num_workers=2, batches_per_epoch=5, shuffle_buffer=16,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[DataStats()],
    )
    trainer.fit(Recorder(out), datamodule=dm)


if __name__ == "__main__":
    main()
