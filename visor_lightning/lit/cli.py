"""``visor fit|validate|test``: LightningCLI over the stage modules and the streaming DataModule.

Typed ``__init__`` signatures are the config schema; YAML goes through omegaconf (``${...}`` interpolation).
On top of plain LightningCLI this adds what every VISOR run needs: an MLflow run per stage (nested under a
pipeline run when there is one, and the same run again on resume), a checkpoint every N steps with
``last.ckpt`` for ``--ckpt_path last``, gradient accumulation derived from ``--global_batch_size``, bf16-mixed
where the hardware has it, a Rich progress bar, data skip counts, and the final weights as artifacts.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from visor_lightning.data.datamodule import VisorDataModule

from .module import VisorLitModule
from .safety import NonFiniteLossError
from .tracking import METRICS_ENV, TrackingUnavailable, check_tracking_server, data_fingerprint, open_stage_logger


def default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def count_devices(devices: Any) -> int:
    """Lightning's ``devices`` (2, "2", [0, 1], "0,1", "auto", -1) as a count on this machine."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
    if devices == "auto" or devices == -1:
        return torch.cuda.device_count() or 1
    if isinstance(devices, int) and devices > 0:
        return devices
    raise ValueError(f"trainer.devices={devices!r}: expected a count, a list of indices, 'auto' or -1")


def accumulation(global_batch: int | None, per_device: int, devices: Any, num_nodes: int) -> int:
    """Micro-batches per optimizer step so that batch x devices x nodes x accumulation == global batch."""
    if global_batch is None:
        return 1
    n_dev = count_devices(devices)
    per_step = per_device * n_dev * num_nodes
    if global_batch % per_step:
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of batch_size {per_device} x {n_dev} device(s) x "
            f"{num_nodes} node(s) = {per_step}"
        )
    return global_batch // per_step


def epochs_for_max_steps(cfg) -> None:
    """Raise ``trainer.max_epochs`` so that ``trainer.max_steps`` is reachable. An epoch is ``data.batches_per_epoch``
    batches of the resampled stream, so a max_steps beyond max_epochs' worth stopped short without a word, and a
    finished run resumed with a larger max_steps trained 0 steps (it had done its epochs)."""
    t = cfg.trainer
    steps, epochs = t.get("max_steps") or -1, t.get("max_epochs")
    if steps <= 0 or epochs is None or epochs < 0 or t.get("fast_dev_run"):
        return
    workers = max(1, cfg.data.get("num_workers") or 0)
    batches = -(-cfg.data.batches_per_epoch // workers) * workers  # the loader rounds up to whole workers
    per_epoch = -(-batches // max(1, t.get("accumulate_grad_batches") or 1))  # the last, partial one steps too
    needed = -(-steps // per_epoch)
    if needed > epochs:
        print(f"[visor] trainer.max_steps {steps} at {per_epoch} optimizer steps per epoch (data.batches_per_epoch "
              f"{cfg.data.batches_per_epoch}) needs {needed} epochs: trainer.max_epochs {epochs} -> {needed}")
        t.max_epochs = needed


def latest_checkpoint(root: Path) -> str | None:
    """``--ckpt_path last``: the newest valid one of ``checkpoints/last.ckpt``, the periodic ``step=N.ckpt`` and
    the ``hpc_ckpt_<n>.ckpt`` written on a Slurm pre-emption signal (callbacks/preemption.py); a damaged file is
    skipped with a message. None (a fresh start) when there is none yet, e.g. a job's first run."""
    from .safety import checkpoint_candidates, last_good_checkpoint

    newest = last_good_checkpoint(root)
    if newest is None:
        if checkpoint_candidates(root):
            raise ValueError(f"--ckpt_path last: every checkpoint in {root} is damaged (see above); "
                             "move them away to start from the beginning")
        print(f"[visor] --ckpt_path last: no checkpoint in {root} yet, starting from the beginning")
        return None
    print(f"[visor] --ckpt_path last: resuming from {newest}")
    return str(newest)


def config_error_place(message: str, argv: list[str]) -> str:
    """Where the offending key of a jsonargparse error was set: ``lr`` -> "'lr' (stage.yaml line 12)"."""
    import re

    keys = re.findall(r'(?:Parser key|Key|Option) ["\']([\w.]+)["\']', message)
    missing = re.findall(r"File does not exist: '([^']+)'", message)
    if missing or not keys:
        return f"config file {missing[0]} not found" if missing else "invalid configuration"
    key = keys[-1]  # the innermost one
    places = []
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    for f in configs:
        try:
            for n, line in enumerate(Path(f).read_text().splitlines(), 1):
                if re.match(rf"\s*{re.escape(key.split('.')[-1])}\s*:", line):
                    places.append(f"{f} line {n}")
        except OSError:
            places.append(f"{f} (unreadable)")
    if any(a.split("=")[0].endswith("." + key) or a == f"--{key}" for a in argv):
        places.append("the command line")
    return f"key '{key}' ({', '.join(places) or 'set in ' + ', '.join(configs or ['the command line'])})"


class VisorCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        from visor_lightning.quiet import quiet_third_party

        quiet_third_party()
        if args is not None:  # visor's own callers (pipeline, eval) pass argument lists on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        self.with_subcommands = run  # run=False (visor eval, bench data): one parser, no fit/validate keys
        super().__init__(
            model_class=VisorLitModule,
            subclass_mode_model=True,
            datamodule_class=VisorDataModule,
            save_config_callback=None,  # the resolved config goes to the run directory and MLflow (see below)
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            trainer_defaults={"num_sanity_val_steps": 0, "precision": default_precision(), "log_every_n_steps": 10},
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse errors name the key and where it was set (which --config file and line, or the command line),
        before any model is built."""
        from jsonargparse import ArgumentError

        from visor_lightning.config_check import check_stage_args

        for p in [parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            p.exit_on_error = False
        argv = list(sys.argv[1:] if args is None else args)
        if "--help" not in argv and "-h" not in argv:
            check_stage_args(argv)  # every unknown key at once, with its line
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            print(f"visor {argv[0] if argv else ''}: error: {config_error_place(str(e), argv)}\n{e}", file=sys.stderr)
            raise SystemExit(2) from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str, default="visor", help="MLflow experiment name")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="MLflow run name between the experiment and the commit (default: the stage)")
        parser.add_argument("--global_batch_size", type=int | None, default=None,
                            help="derive trainer.accumulate_grad_batches from data.batch_size x devices x nodes")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50, help="write last.ckpt this often")
        parser.add_argument("--mlflow", type=bool, default=True, help="log this run to MLflow")
        if not getattr(self, "with_subcommands", True):  # a run's own config.yaml (written by `visor fit`) carries fit's keys
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="`visor fit`'s resume key, accepted so a run's config.yaml loads; not used here")
            parser.add_argument("--weights_only", type=bool | None, default=None, help="`visor fit`'s key, not used here")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        gbs = cfg.get("global_batch_size")
        if gbs is not None:
            t = cfg.trainer
            cfg.trainer.accumulate_grad_batches = accumulation(gbs, cfg.data.batch_size, t.devices, t.num_nodes)
        epochs_for_max_steps(cfg)
        if not cfg.trainer.get("default_root_dir"):
            cfg.trainer.default_root_dir = "runs/default"
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = latest_checkpoint(Path(cfg.trainer.default_root_dir))
        if cfg.mlflow and not cfg.trainer.get("fast_dev_run"):
            check_tracking_server()  # before any model is built: a dead server fails now, not after loading

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.fabric.plugins.environments import SLURMEnvironment
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, RichProgressBar

        from visor_lightning.callbacks.data_stats import DataStats
        from visor_lightning.callbacks.preemption import SlurmPreemption, in_slurm_batch_job
        from visor_lightning.callbacks.mlflow_artifacts import MlflowArtifacts
        from visor_lightning.callbacks.progress_lines import ProgressLines

        from .safety import AtomicCheckpointIO

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(cfg.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        config_yaml = root / "config.yaml"
        config_yaml.write_text(self._parser(self.subcommand).dump(cfg, skip_none=False))
        resume = self.subcommand == "fit" and cfg.get("ckpt_path") is not None
        stage = getattr(self.model, "stage", "run")
        logger = None
        if cfg.mlflow and not cfg.trainer.get("fast_dev_run"):
            dm = self.datamodule
            logger = open_stage_logger(root, experiment=cfg.experiment, stage=stage, name=cfg.run_name,
                                       model=self.model, resume=resume, data=data_fingerprint(dm.train_spec, dm.val_spec))
        # the user's trainer.callbacks (YAML or --trainer.callbacks+=...) first: kwargs would replace them otherwise
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        user = init.trainer.get("callbacks") or []
        callbacks = [*(user if isinstance(user, list) else [user]), *(kwargs.pop("callbacks", None) or [])]
        callbacks += [
            # no last-v1.ckpt: a run resumed with other checkpoint settings is not recognised by Lightning as
            # the writer of last.ckpt and would version it (a second full state); writes are atomic
            ModelCheckpoint(dirpath=root / "checkpoints", filename="{step}", save_last=True, save_top_k=1,
                            every_n_train_steps=cfg.checkpoint_every_n_steps, enable_version_counter=False),
            DataStats(),
            MlflowArtifacts(root, config_yaml, self.config_dump_for_params(cfg)),
        ]
        if logger is not None:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if not sys.stdout.isatty():  # a Slurm log, CI, `| tee`: plain lines, no bar
            callbacks += [ProgressLines(cfg.run_name or stage), ModelSummary()]  # plain text, no Rich boxes
            kwargs["enable_progress_bar"] = False
        elif cfg.trainer.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar(leave=True))
        # every .ckpt write is atomic (DeepSpeed strategies write their own checkpoint directories and ignore it)
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
        if in_slurm_batch_job():
            # visor's SIGUSR1 handling replaces Lightning's (which checkpoints inside the signal handler)
            callbacks.append(SlurmPreemption(root))
            kwargs["plugins"] = [*(kwargs.get("plugins") or []), SLURMEnvironment(auto_requeue=False)]
        kwargs["callbacks"] = callbacks
        kwargs["logger"] = logger if logger is not None else False
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def config_dump_for_params(cfg) -> dict[str, Any]:
        """The resolved config, flattened for MLflow params (``ckpt_path`` left out: it changes on resume)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) or hasattr(node, "items"):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = node

        walk("", cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg))
        out.pop("ckpt_path", None)
        out.pop("config", None)
        return out


def user_message(e: BaseException) -> str:
    """The cause a user can act on: jsonargparse wraps a stage's own error (e.g. a missing ``init_from``) in
    "Does not validate against any of the Union subtypes ..." with the model's whole namespace; keep the cause."""
    text = str(e)
    if "Does not validate against any of the Union subtypes" in text:
        causes = [ln.strip()[2:] for ln in text.splitlines()
                  if ln.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
        if causes:
            return causes[0]
    return text


def run_cli(args: list[str] | None) -> VisorCLI:
    """``args=None`` reads ``sys.argv[1:]`` (the shell); the pipeline passes its own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cli = VisorCLI(args=args)
        if os.environ.get(METRICS_ENV) and cli.trainer.is_global_zero:
            final = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
            if torch.cuda.is_available():  # `visor realsize` on a GPU: device memory beside the host's
                final["cuda/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            Path(os.environ[METRICS_ENV]).write_text(json.dumps(final))
        return cli
    except (TrackingUnavailable, NonFiniteLossError, ValueError, FileNotFoundError) as e:
        # what a user can fix (a wrong path, a batch size that does not divide, a dead server): one line, no
        # traceback; VISOR_TRACEBACK=1 shows it. The pipeline and the tests (args given) get the exception itself.
        if args is not None:
            raise
        from visor_lightning.errors import report

        raise SystemExit(report((sys.argv[1:2] or ["fit"])[0], e, user_message(e))) from None
