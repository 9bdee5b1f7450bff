"""MLflow, the record of every experiment: where the store is, one run per stage, resume into the same run.

The store is ``sqlite:///<runs root>/mlflow.db`` (``runs/`` by default, ``VISOR_RUNS_ROOT`` moves it) unless
``MLFLOW_TRACKING_URI`` is set. A stage's run id is kept in ``<run dir>/mlflow_run_id``, so a resumed (or
requeued) stage keeps logging into the same run. ``VISOR_PARENT_RUN_ID`` nests stage runs under a pipeline run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
PARENT_ENV = "VISOR_PARENT_RUN_ID"


def tracking_uri(create: bool = True) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("VISOR_RUNS_ROOT", "runs")).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer: raised before any model is built."""


def check_tracking_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """For an ``http(s)://`` store, ask ``/health`` once; a local sqlite store needs no check."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri(create=False)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingUnavailable(
        f"the MLflow server at MLFLOW_TRACKING_URI={uri} does not answer ({problem}). Start it "
        f"(mlflow server --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1 --port <port>), fix the URI, "
        "unset MLFLOW_TRACKING_URI to log to the local store runs/mlflow.db, or pass --mlflow false")


def run_tags(model: Any, stage: str) -> dict[str, str]:
    spec, sch = model.spec, model.schedule
    t = spec.text
    backbone = Path(spec.pretrained).name if spec.pretrained else f"d{t.hidden_size}-L{t.num_layers}-v{t.vocab_size}"
    tags = {"stage": stage, "backbone": backbone, "schedule": sch.describe(), "feasible": ", ".join(sch.names)}
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    return tags


def open_stage_logger(root: Path, *, experiment: str, stage: str, run_name: str | None, model: Any, resume: bool):
    """An MLFlowLogger for this stage (None on ranks other than zero); on resume, the run recorded in
    ``root/mlflow_run_id``."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import MLFlowLogger

    if rank_zero_only.rank != 0:
        # Only rank zero logs. Ranks started together (srun, torchrun) must not all open a new sqlite store:
        # MLflow's schema migration races ("table _alembic_tmp_metrics already exists").
        return None
    id_file = Path(root) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri(), run_name=run_name or stage,
                          run_id=run_id, tags=run_tags(model, stage), log_model=False)
    id_file.write_text(logger.run_id)  # creates the run now, so a crash before the first log still resumes it
    return logger
