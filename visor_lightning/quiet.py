"""Known third-party noise, filtered in one place at start-up (``visor`` and every in-process stage call it).

Only messages that say nothing about the run are dropped: Lightning's advertising tips (and its note that a
ModelSummary callback is already there), torch's ``LeafSpec`` deprecation (raised inside Lightning), Lightning's
``srun`` hint outside a Slurm job, SQLAlchemy's ``noload`` deprecation (raised inside MLflow's store), and
transformers' weight loading/saving bars. Anything else, and every unknown warning, still shows. ``VISOR_SHOW_ALL_LOGS=1`` turns the filters off (to see everything).
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category): matched against the start of the warning text
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"The ``noload`` loader strategy is deprecated", Warning),
    (r"The :func:`_orm.noload` option is deprecated", Warning),
)
SRUN_HINT = r"The `srun` command is available on your system but is not used"
# Lightning info lines that say nothing about the run: its advertising tips, and the note that visor's own plain
# ModelSummary (chosen for non-terminal logs) replaced the default one
DROPPED_INFO = ("💡 Tip:", "Trainer already configured with model summary callbacks")
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(DROPPED_INFO)


def in_slurm_job() -> bool:
    """Inside an allocation the srun hint may matter (a job started without srun); outside it never does."""
    return "SLURM_JOB_ID" in os.environ


def quiet_third_party() -> None:
    """Install the filters (idempotent). Environment variables are set only where the user has not set them."""
    if os.environ.get("VISOR_SHOW_ALL_LOGS", "") not in ("", "0"):
        return
    for pattern, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if not in_slurm_job():
        warnings.filterwarnings("ignore", message=SRUN_HINT)
    for name in RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    # transformers reads this when it is first imported: no "Loading weights" / "Writing model shards" bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sys

    if "transformers" in sys.modules:  # imported before the variable was set (an in-process caller)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
