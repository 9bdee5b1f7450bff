"""DeepSpeed ZeRO that also runs on CPU over gloo, so tests exercise DeepSpeed itself and not a stand-in.

Lightning's ``DeepSpeedStrategy`` refuses the CPU accelerator. On CUDA this class *is* that strategy, unchanged.
On CPU it changes three things (found by running it, see ../shared/notes/stack-facts.md):
``root_device`` is ``cpu:<local rank>``, the CUDA-only check in ``setup_environment`` is skipped, and
``setup_distributed`` skips the device-index validation (CPU devices have no index). DeepSpeed's CPU
shared-memory all-reduce op (a ~30 s JIT build on first use) is replaced by plain gloo collectives.
This leans on Lightning internals, which is why lightning is pinned.
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed


def _skip_shm_op_build() -> None:
    """gloo does the CPU collectives; DeepSpeed's optional shm all-reduce would JIT-compile a C++ op first.

    The module object must be patched through ``sys.modules``: ``import deepspeed.comm.torch as m`` binds
    ``torch`` itself (deepspeed.comm re-exports it under that name).
    """
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class VisorDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` (ZeRO 1/2/3) on CUDA, and the same code path on CPU processes over gloo."""

    strategy_name = "visor_deepspeed"

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def setup_environment(self) -> None:
        if self._on_cpu():
            _skip_shm_op_build()
            DDPStrategy.setup_environment(self)  # everything DeepSpeedStrategy does, minus the CUDA check
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _auto_select_batch_size(self) -> int:
        """DeepSpeed's ``train_micro_batch_size_per_gpu``: the streaming DataModule batches inside the dataset
        (the loader has no batch sampler), so take its ``batch_size``."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        return int(size) if size else super()._auto_select_batch_size()
