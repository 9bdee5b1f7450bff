"""The optimizer every stage trains with (and the benchmarks time): AdamW, fused where torch has the kernel.

Fused AdamW updates each parameter in one kernel instead of a dozen framework ops: on the CPU demo's tiny model a
bare training step went from 48.6 to 45.2 ms (batch 8, one thread; docs/science.md, "Throughput"); on GPUs it is
the usual choice. The update is the same up to rounding. Parameters that are not floating point, or live where
torch has no fused kernel, fall back to the default implementation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused when every parameter allows it (unless ``fused`` is given)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = list(params)
    if "fused" not in kwargs:
        devices = set(_get_fused_kernels_supported_devices())
        fusable = bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)
        kwargs["fused"] = True if fusable else None
    return torch.optim.AdamW(params, **kwargs)


__all__ = ["adamw"]
