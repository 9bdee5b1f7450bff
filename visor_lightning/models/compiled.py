"""``torch.compile`` for VisorModel, one repeated block at a time.

The Python between blocks (splitting text and visual streams, choosing each sample's configuration, routing rows
to SA or text-only calls) stays eager, so per-sample configurations, the dense base and the universal stage's
per-step configuration need no graph breaks: each decoder layer, CA block and vision-encoder layer is compiled
on its own, and layers of one class share their compiled code (parameters are graph inputs). Shapes are static
(fastest on CPU in our measurements); every new (rows, length) shape compiles once more, so pad sequences to a
multiple (``data.pad_to_multiple_of``) to keep their number small.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_classes: set[type] = set()  # block classes compiled in this process: the first graph of each is no recompile
CACHE_SIZE_LIMIT = 256  # compiled shapes per block class before dynamo falls back to eager (it warns when it does)


def compile_blocks(model: nn.Module, dynamic: bool | None = False) -> int:
    """Compile the repeated blocks of a ``VisorModel`` in place; returns how many modules were wrapped."""
    return compile_lm(model.lm, dynamic) + _compile(vision_layers(model), dynamic)


def compile_lm(lm: nn.Module, dynamic: bool | None = False) -> int:
    """The language backbone's part: every decoder layer and CA block of a ``VisorLanguageModel``."""
    return _compile([*lm.layers, *lm.ca_blocks.values()], dynamic)


def _compile(blocks: list[nn.Module], dynamic: bool | None) -> int:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                            4 * CACHE_SIZE_LIMIT)
    for block in blocks:
        block.compile(dynamic=dynamic)
    _classes.update(type(b) for b in blocks)
    return len(blocks)


def vision_layers(model: nn.Module) -> list[nn.Module]:
    """SigLIP's encoder layers inside the vision tower (transformers nests them under ``vision_model`` or not)."""
    tower = model.vision.tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    return list(encoder.layers) if encoder is not None else []


def compile_stats() -> dict[str, Any]:
    """What compiling cost this process so far: graphs compiled, recompiles (graphs beyond one per block class:
    each new shape), seconds spent in dynamo + inductor, forward and backward."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(compilation_time_metrics.get(k, [])) for k in ("_compile.compile_inner", "backward._backward_impl"))
    graphs = int(counters["stats"].get("unique_graphs", 0))
    return {"graphs": graphs, "recompiles": max(0, graphs - len(_classes)), "seconds": float(seconds)}


def stats_text(stats: dict[str, Any]) -> str:
    return f"compile {stats['seconds']:.1f} s, {stats['graphs']} graphs ({stats['recompiles']} recompiles)"
