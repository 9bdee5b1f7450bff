"""MLflow, the record of every experiment: where the store is, one run per stage, resume into the same run.

The store is ``sqlite:///<runs root>/mlflow.db`` (``runs/`` by default, ``VISOR_RUNS_ROOT`` moves it) unless
``MLFLOW_TRACKING_URI`` is set. A stage's run id is kept in ``<run dir>/mlflow_run_id``, so a resumed (or
requeued) stage keeps logging into the same run. ``VISOR_PARENT_RUN_ID`` nests stage runs under a pipeline run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
PARENT_ENV = "VISOR_PARENT_RUN_ID"
METRICS_ENV = "VISOR_FINAL_METRICS"  # a file: `visor pipeline` reads a child `visor fit`'s final metrics from it


def tracking_uri(create: bool = True) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("VISOR_RUNS_ROOT", "runs")).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(experiment: str, uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store (``<store dir>/mlartifacts/<name>``),
    whatever the working directory (MLflow's default is ``./mlruns`` of the process that creates it). None for a
    server, which decides itself."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment.replace("/", "_")).as_uri()


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created with its artifacts beside the store if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(name, client.tracking_uri))


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


@functools.lru_cache(maxsize=1)
def code_version() -> tuple[str, bool]:
    """(commit, uncommitted changes?) of the code that runs: a Slurm job snapshot's ``GIT_COMMIT`` (and
    ``git.diff``), else the checkout's git; ``unknown`` for an installed copy."""
    import subprocess

    root = Path(__file__).resolve().parents[2]  # the checkout, or a job snapshot's code/ directory
    if (root / "GIT_COMMIT").is_file():
        sha = (root / "GIT_COMMIT").read_text().strip()
        return (sha if len(sha) == 40 else "unknown"), (root / "git.diff").is_file()
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown", False
    dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    return head.stdout.strip(), dirty


def run_name(experiment: str, stage: str) -> str:
    """Stable, comparable run names: ``<experiment>-<stage>-<short commit>``."""
    return f"{experiment}-{stage}-{code_version()[0][:7]}"


def data_fingerprint(train: Any, val: dict[str, Any]) -> str:
    """A short hash of the data a run reads: manifests by content, other shards by name and size."""
    import hashlib

    from visor_lightning.data.datamodule import resolve_shards

    h = hashlib.sha256()
    for field, spec in [("train", train), *sorted((f"val.{k}", v) for k, v in val.items())]:
        h.update(field.encode())
        for s in ([spec] if isinstance(spec, str) else list(spec or [])):
            if s.endswith("-manifest.json") and Path(s).is_file():
                h.update(Path(s).read_bytes())
                continue
            try:
                urls = resolve_shards(s, field=f"data.{field}")
            except (ValueError, FileNotFoundError):
                urls = [s]
            for u in urls:
                size = Path(u).stat().st_size if Path(u).is_file() else -1
                h.update(f"{Path(u).name}:{size}".encode())
    return h.hexdigest()[:12]


def run_tags(model: Any, stage: str, data: str | None = None) -> dict[str, str]:
    """stage, backbone shapes (and checkpoint), schedule, feasible set, code commit and the data fingerprint."""
    spec, sch = model.spec, model.schedule
    t = spec.text
    sha, dirty = code_version()
    tags = {"stage": stage, "backbone": f"d{t.hidden_size}-L{t.num_layers}-h{t.num_heads}/{t.num_kv_heads}-v{t.vocab_size}",
            "schedule": sch.describe(), "feasible": ", ".join(sch.names), "git_commit": sha,
            "git_dirty": str(dirty).lower()}
    if spec.pretrained:
        tags["backbone_checkpoint"] = str(spec.pretrained)
    if spec.token_pool != 1:
        tags["token_pool"] = str(spec.token_pool)
    if data:
        tags["data"] = data
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    return tags


def resilient_logger_class():
    """MLFlowLogger whose metric writes survive an MLflow server that goes away mid-run (defined lazily: Lightning
    imports stay out of ``visor --help``)."""
    import time

    from lightning.pytorch.loggers import MLFlowLogger

    class ResilientMLFlowLogger(MLFlowLogger):
        """Failed metric writes are kept in order and sent when the server answers again (retried at most every
        ``retry_s``; training never waits on a dead server); each outage is printed and recorded in the run as
        the tag ``mlflow_gaps``. Metrics still unsent when training ends go to ``<run>/mlflow_unsent.jsonl``."""

        retry_s = 10.0

        def __init__(self, *args: Any, root: Path | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pending: list[tuple[dict[str, float], int | None]] = []
            self._down: tuple[int | None, float, str] | None = None  # (first step kept, since, error)
            self._next_try = 0.0
            self.gaps: list[str] = []
            self._root = root

        def log_metrics(self, metrics, step=None) -> None:
            self._pending.append(({k: float(v) for k, v in metrics.items() if not isinstance(v, str)}, step))
            self._flush()

        def _flush(self, force: bool = False) -> bool:
            if self._down and not force and time.monotonic() < self._next_try:
                return False
            while self._pending:
                metrics, step = self._pending[0]
                try:
                    super().log_metrics(metrics, step)
                except Exception as e:  # noqa: BLE001 - any transport error: keep the metrics, keep training
                    if self._down is None:
                        self._down = (step, time.monotonic(), str(e).splitlines()[0][:200])
                        print(f"[mlflow] the server at {self._tracking_uri} stopped answering at step {step} "
                              f"({self._down[2]}); training goes on, metrics are kept and sent when it is back",
                              flush=True)
                    self._next_try = time.monotonic() + self.retry_s
                    return False
                self._pending.pop(0)
            if self._down is not None:
                first, since, _ = self._down
                gap = f"steps {first}..{step} ({time.monotonic() - since:.0f} s)"
                self.gaps.append(gap)
                print(f"[mlflow] the server is back: metrics of {gap} sent late", flush=True)
                self._down = None
                try:
                    self.experiment.set_tag(self.run_id, "mlflow_gaps", "; ".join(self.gaps))
                except Exception:  # noqa: BLE001
                    pass
            return True

        def finalize(self, status: str = "success") -> None:
            deadline = time.monotonic() + 3 * self.retry_s
            while not self._flush(force=True) and time.monotonic() < deadline:
                time.sleep(1.0)
            if self._pending:
                import json

                out = (self._root or Path(".")) / "mlflow_unsent.jsonl"
                with open(out, "a") as f:
                    for metrics, step in self._pending:
                        f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
                print(f"[mlflow] the server is still down: {len(self._pending)} metric batches written to {out}; "
                      f"send them later with: visor mlflow-sync {out.parent}", flush=True)
                self._pending.clear()
            try:
                super().finalize(status)
            except Exception as e:  # noqa: BLE001 - the run's end status could not be recorded; training is done
                print(f"[mlflow] could not mark the run {status} ({str(e).splitlines()[0][:200]})", flush=True)

    return ResilientMLFlowLogger


def open_stage_logger(root: Path, *, experiment: str, stage: str, name: str | None, model: Any, resume: bool,
                      data: str | None = None):
    """An MLFlowLogger for this stage (None on ranks other than zero), named ``<experiment>-<name>-<commit>``; on
    resume, the run recorded in ``root/mlflow_run_id``."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        # Only rank zero logs. Ranks started together (srun, torchrun) must not all open a new sqlite store:
        # MLflow's schema migration races ("table _alembic_tmp_metrics already exists").
        return None
    id_file = Path(root) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):  # a dead server must fail a request fast, not retry for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    logger = resilient_logger_class()(experiment_name=experiment, tracking_uri=uri, run_name=run_name(experiment, name or stage),
                                      run_id=run_id, tags=run_tags(model, stage, data), log_model=False, root=Path(root),
                                      artifact_location=artifact_location(experiment, uri))
    id_file.write_text(logger.run_id)  # creates the run now, so a crash before the first log still resumes it
    return logger


def sync_unsent(run_dir: str | Path) -> int:
    """Send ``<run_dir>/mlflow_unsent.jsonl`` (metrics kept while the MLflow server was down at the end of a run)
    into the run recorded in ``<run_dir>/mlflow_run_id``; the file is renamed ``.sent`` afterwards. Returns the
    number of metric values sent."""
    import json
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    run_dir = Path(run_dir)
    unsent, id_file = run_dir / "mlflow_unsent.jsonl", run_dir / RUN_ID_FILE
    if not unsent.is_file():
        raise FileNotFoundError(f"{unsent}: nothing to sync (the run's metrics all reached MLflow)")
    if not id_file.is_file():
        raise FileNotFoundError(f"{id_file} is missing: which MLflow run these metrics belong to is unknown")
    uri = tracking_uri()
    check_tracking_server(uri)
    client, run_id = MlflowClient(uri), id_file.read_text().strip()
    now = int(time.time() * 1000)
    metrics = [Metric(key=k, value=float(v), timestamp=now, step=rec["step"] or 0)
               for line in unsent.read_text().splitlines() if line.strip()
               for rec in [json.loads(line)] for k, v in rec["metrics"].items()]
    for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    unsent.rename(unsent.with_suffix(".jsonl.sent"))
    return len(metrics)

