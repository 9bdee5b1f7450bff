"""Saying what happened to the data: one summary line for people, metrics for MLflow when a run is active."""

from __future__ import annotations

import os
from typing import Any


def summary_line(manifest: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    converted = ", ".join(f"{k} {v}" for k, v in manifest["converted"].items()) or "none"
    return (
        f"{manifest['split']}: {manifest['written']} written + {sum(manifest['skipped'].values())} skipped = "
        f"{manifest['input']} input, {len(manifest['shards'])} shard(s); skipped: {skipped}; converted: {converted}"
    )


def log_counts_to_mlflow(prefix: str, counts: dict[str, int], params: dict[str, Any] | None = None) -> bool:
    """Log ``counts`` as ``{prefix}/{name}`` metrics into the active MLflow run (or ``MLFLOW_RUN_ID``'s).

    Returns False (and does nothing) when no run is active: building shards never creates runs of its own.
    """
    if "MLFLOW_RUN_ID" not in os.environ:
        import sys

        if "mlflow" not in sys.modules:
            return False
    import mlflow

    started = False
    if mlflow.active_run() is None:
        if "MLFLOW_RUN_ID" not in os.environ:
            return False
        mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        started = True
    try:
        mlflow.log_metrics({f"{prefix}/{k}": float(v) for k, v in counts.items()})
        if params:
            mlflow.log_params({f"{prefix}/{k}": str(v)[:500] for k, v in params.items()})
    finally:
        if started:
            mlflow.end_run()
    return True


def manifest_counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {
        "input": manifest["input"], "written": manifest["written"],
        **{f"skipped_{k}": v for k, v in manifest["skipped"].items()},
        **{k: v for k, v in manifest["converted"].items()},
    }
