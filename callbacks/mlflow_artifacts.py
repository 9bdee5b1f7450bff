"""What a stage leaves behind in its run directory and in MLflow: the resolved config (params + YAML), the
evaluation table and an accuracy-vs-FLOPs plot after every validation, and the final weights (safetensors +
visor.json) at the end of fit. Rank zero only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger


def _mlflow(trainer: pl.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def plot_accuracy_vs_flops(results: dict[str, dict[str, dict[str, Any]]], out: Path, title: str,
                           dense: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per evaluation set: accuracy vs prefill GFLOPs per sample for every configuration (dots), the
    policy (star), the FastV peer (cross) and, when known, the dense model (square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        labels: list[tuple[float, float, list[str]]] = []  # points within 1% FLOPs and 0.1 points share a label
        for name, r in results[s].items():
            marker, size = ("*", 220) if name.startswith("policy") else ("x", 70) if name.startswith("fastv") else ("o", 60)
            x, y = r["gflops"], 100 * r["acc"]
            ax.scatter(x, y, marker=marker, s=size, zorder=3)
            near = next((lab for lab in labels if abs(lab[0] - x) <= 0.01 * x and abs(lab[1] - y) <= 0.1), None)
            if near:
                near[2].append(name)
            else:
                labels.append((x, y, [name]))
        for x, y, names in labels:
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if dense and s in dense:
            ax.scatter(dense[s]["gflops"], 100 * dense[s]["acc"], marker="s", s=70, color="black", zorder=3)
            ax.annotate("dense", (dense[s]["gflops"], 100 * dense[s]["acc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        label_axis(ax, f"{title}: {s}")
    return save_figure(fig, out)


def label_axis(ax, title: str) -> None:
    """The axes every accuracy-vs-FLOPs panel has."""
    ax.set_xlabel("LLM prefill GFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _upload(send, path: Path) -> None:
    """An artifact upload that fails (the MLflow server went away) is reported, not fatal: the file stays on disk."""
    try:
        send()
    except Exception as e:  # noqa: BLE001
        print(f"[mlflow] {path} was not uploaded ({str(e).splitlines()[0][:200]}); it stays on disk", flush=True)


class MlflowArtifacts(pl.Callback):
    def __init__(self, root: str | Path, config_yaml: str | Path, params: dict[str, Any]) -> None:
        self.root, self.config_yaml, self.params = Path(root), Path(config_yaml), params

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        params = {k: str(v)[:5000] for k, v in self.params.items()}
        # A resumed run (``--ckpt_path last``, a Slurm requeue) may change settings, e.g. a longer max_steps.
        # MLflow params are write-once, so changes are kept as tags ``resumed.<key>`` = "old -> new".
        logged = logger.experiment.get_run(logger.run_id).data.params
        changed = {k: f"{logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            print(f"[mlflow] resumed run {logger.run_id} with changed settings: "
                  + ", ".join(f"{k}: {v}" for k, v in changed.items()))
            for k, v in changed.items():
                logger.experiment.set_tag(logger.run_id, f"resumed.{k}", v[:5000])
        new = {k: v for k, v in params.items() if k not in logged}
        if new:
            logger.log_hyperparams(new)
        logger.experiment.log_artifact(logger.run_id, str(self.config_yaml))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "eval_results", None)
        if trainer.sanity_checking or not results or not trainer.is_global_zero:
            return
        doc = {"step": trainer.global_step, "results": results, "tokens": getattr(pl_module, "eval_tokens", {})}
        (self.root / "eval.json").write_text(json.dumps(doc, indent=2))
        png = plot_accuracy_vs_flops(results, self.root / "plots" / "acc_vs_flops.png", getattr(pl_module, "stage", ""))
        logger = _mlflow(trainer)
        if logger is not None:
            _upload(lambda: logger.experiment.log_artifact(logger.run_id, str(png), "plots"), png)
            _upload(lambda: logger.experiment.log_artifact(logger.run_id, str(self.root / "eval.json")), self.root / "eval.json")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "visor_preempted", False):
            return  # requeued mid-run (callbacks/preemption.py): not the end of this stage
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from visor_lightning.lit.weights import _deepspeed_fp32, export_llava_onevision, save_weights

        master = None
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # ZeRO shards the fp32 master weights over ranks (the module may hold bf16 copies): every rank writes
            # its shard into a final checkpoint, then rank zero consolidates it into the hand-over weights.
            final = self.root / "checkpoints" / "final.ckpt"
            trainer.save_checkpoint(final)
            if trainer.is_global_zero:
                state = _deepspeed_fp32(final)["state_dict"]
                master = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if not trainer.is_global_zero:
            return
        extra = {"stage": pl_module.stage, "global_step": trainer.global_step,
                 "trainable_params": sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad)}
        if getattr(pl_module, "search_result", None):
            extra["search"] = pl_module.search_result
        weights = save_weights(pl_module.model, self.root / "weights", extra, state=master)
        logger = _mlflow(trainer)
        if pl_module.stage == "base":
            dm = trainer.datamodule
            export_llava_onevision(pl_module.model, self.root / "hf", dm.encoder.tok, dm.encoder.proc)
        if logger is not None:
            _upload(lambda: logger.experiment.log_artifacts(logger.run_id, str(weights), "weights"), weights)
