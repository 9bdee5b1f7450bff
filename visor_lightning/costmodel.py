"""The one time model: the FLOPs model's products, priced on a device profile.

For every op of ``FlopsModel.prefill_ops`` / ``decode_ops`` (the same products the FLOPs are counted from):

    time(op) = max(FLOPs / throughput, bytes / bandwidth)

with throughput read from the profile at the op's own shape (GEMM: its row count M and weight shape; attention:
its total work), and bytes = weights read + activations read and written + K/V read (and, in host prefill layers,
K/V repeated to every query head, as transformers' SDPA path does under a mask). On top, per layer:

* memory-only work: norms, RoPE, residual adds, SwiGLU's elementwise product, VISOR's stream gather/scatter
  (``ACT_D`` x d + ``ACT_M`` x m elements per token) at the profile's elementwise rate, and in decoding the cache
  append, which copies the layer's whole K/V (``torch.cat``) every step, at copy bandwidth (measured once the
  allocator has settled: a first step into freshly mapped memory runs 3-4x slower, page faults included);
* a fixed cost per framework op (``LAUNCHES_*`` ops per layer, counted with torch.profiler on the tiny model:
  ``tests/test_costmodel.py`` keeps them honest) x the profile's ``op_overhead_s``.

A training step is the forward at ``head_rows = nt`` (loss on every text token), its backward (each part scaled by
``BACKWARD``), and AdamW over the trained parameters at the profile's measured seconds per parameter. On a GPU the host's op launches overlap the
kernels, so a pass costs max(kernels, launches) there instead of their sum. The formula is written out in
docs/bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .devprofile import DeviceProfile
from .flops import FlopsModel, Op

# elements x d and x m per token and host layer moved by non-GEMM work (2 RMSNorms, RoPE, 2 residuals, VISOR's
# stream gather/scatter; SiLU(gate) * up), fitted to torch.profiler's non-GEMM, non-attention time of a 0.5B-shaped
# layer over 1,549 tokens (58 ms per layer on this 2-core CPU at 3.7 GB/s elementwise)
ACT_D = 16
ACT_M = 4
# framework ops (torch.profiler's top-level aten ops on the tiny model; tests/test_costmodel.py recounts them at 3, 6 and
# 9 layers): exact for the dense model and a decode step, VISOR's stream bookkeeping within ~6% of a prefill's total
LAUNCHES_PREFILL_LAYER = 65  # per host layer in prefill (layers that every row runs as SA share one interleaved pass)
LAUNCHES_PREFILL_FIXED = 142  # per prefill: embedding, stream split and masks, rotary tables, final norm, head
LAUNCHES_STREAMS = 70  # per VISOR prefill (a schedule with CA layers): CA masks, moving between the streams and the
#                        interleaved sequence around SA layers (measured 52-113 over the demo's and tiny configurations)
LAUNCHES_DECODE_LAYER = 62  # per host layer in one decode step (cache append, mask, RoPE, norms, ...)
LAUNCHES_DECODE_FIXED = 25  # per decode step: embedding, rotary tables, final norm, head
LAUNCHES_CA = 34  # per CA block call
# backward time per forward time, by part: GEMMs 2x (dX and dW, same shapes); attention 3x (the kernel recomputes
# the scores, then four products); elementwise 3x (gradients plus the saved activations read back); launches 2x
BACKWARD = {"gemm": 2.0, "attn": 3.0, "memory": 3.0, "overhead": 2.0}


@dataclass
class Cost:
    """Predicted seconds, split by what bounds them."""

    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # seconds per part: gemm, attn, memory, overhead, optimizer

    def add(self, part: str, seconds: float, flops: float = 0.0, nbytes: float = 0.0) -> None:
        self.seconds += seconds
        self.flops += flops
        self.bytes += nbytes
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds

    def merge(self, other: "Cost") -> None:
        """Add a pass that runs after this one (its seconds as they are, launch overlap included)."""
        self.seconds += other.seconds
        self.flops += other.flops
        self.bytes += other.bytes
        for part, s in other.parts.items():
            self.parts[part] = self.parts.get(part, 0.0) + s

    @classmethod
    def mean(cls, costs: Sequence["Cost"]) -> "Cost":
        out = cls()
        for c in costs:
            out.merge(c)
        n = max(len(costs), 1)
        out.seconds, out.flops, out.bytes = out.seconds / n, out.flops / n, out.bytes / n
        out.parts = {k: v / n for k, v in out.parts.items()}
        return out

    def scaled(self, factors: dict[str, float]) -> "Cost":
        """This pass's parts each scaled by ``factors`` (the backward of a forward); FLOPs doubled."""
        out = Cost(flops=2 * self.flops, bytes=self.bytes)
        for part, s in self.parts.items():
            out.add(part, factors[part] * s)
        return out

    def overlap_launches(self) -> None:
        """On a GPU the host queues kernels while earlier ones run: a pass takes the longer of the two, not the sum."""
        over = self.parts.get("overhead", 0.0)
        self.seconds = max(self.seconds - over, over)


class CostModel:
    """Time of prefill, decode and training steps for one backbone and schedule on one device profile."""

    def __init__(self, fm: FlopsModel, profile: DeviceProfile, bytes_per_element: int = 4, cat_appends: bool = True,
                 decode_launches: bool = True) -> None:
        """``cat_appends``: decoding copies each layer's cache to append a token (``VisorCache``, torch.cat); False
        prices an engine that writes the new K/V in place (paged attention). ``decode_launches=False`` prices a
        decode step replayed as one CUDA graph (no per-op launch cost). ``visor bench serve`` sets both to False."""
        self.fm, self.profile, self.bpe = fm, profile, bytes_per_element
        self.cat_appends, self.decode_launches = cat_appends, decode_launches

    # ---- one op -----------------------------------------------------------------------------------------
    def op_bytes(self, op: Op, decode: bool) -> float:
        fm, b = self.fm, self.bpe
        if op.kind == "gemm":
            return b * (op.k * op.n + op.rows * op.k + op.rows * op.n)
        q_o = 2 * op.batch * op.rows * fm.d
        kv = op.batch * op.keys * 2 * fm.d_kv
        repeat = 0 if (decode or op.block == "ca" or fm.d_kv == fm.d) else 2 * op.batch * op.keys * 2 * fm.d
        mask = op.batch * op.rows * op.keys / b  # boolean mask, one byte per entry
        return b * (q_o + kv + repeat + mask)

    def op_seconds(self, op: Op, decode: bool = False) -> tuple[float, float]:
        """(seconds, bytes) of one op: the slower of its compute at the profiled throughput and its memory traffic."""
        nbytes = self.op_bytes(op, decode)
        if op.kind == "gemm":
            thr = self.profile.gemm_flops(op.rows, op.k, op.n)
        else:
            thr = self.profile.sdpa_flops(op.batch, op.rows, op.keys)
        return max(op.flops / thr, nbytes / self.profile.bandwidth), nbytes

    def _price(self, ops: Sequence[Op], cost: Cost, decode: bool) -> None:
        for op in ops:
            s, nbytes = self.op_seconds(op, decode)
            cost.add(op.kind, s, op.flops, nbytes)

    def _memory(self, cost: Cost, elements: float, copy: bool = False) -> None:
        """Memory-only work: elementwise ops at the profile's elementwise rate, plain copies at its bandwidth."""
        nbytes = elements * self.bpe
        cost.add("memory", nbytes / (self.profile.bandwidth if copy else self.profile.elementwise), 0.0, nbytes)

    def _overhead(self, cost: Cost, launches: float) -> None:
        cost.add("overhead", launches * self.profile.op_overhead_s)

    # ---- passes -----------------------------------------------------------------------------------------
    def _layers(self, keys: Sequence[int], ca_nv: int | None) -> tuple[int, int]:
        ca = len(self.fm.schedule.ca_layers) if ca_nv is not None else 0
        return len(keys), ca

    def prefill(self, keys: Sequence[int], nt: int, *, batch: int = 1, ca_nv: int | None = None, routed: bool = False,
                head_rows: int = 1, backward: bool = False) -> Cost:
        """Prefill whose layer l runs over nt + keys[l] tokens (see ``FlopsModel.prefill_ops``); ``backward``: the
        backward pass of that forward (each part scaled by ``BACKWARD``)."""
        cost = Cost()
        fm = self.fm
        ops = fm.prefill_ops(keys, nt, batch=batch, ca_nv=ca_nv, routed=routed, head_rows=head_rows)
        self._price(ops, cost, decode=False)
        tokens = sum(batch * (nt + v) for v in keys)
        self._memory(cost, tokens * (ACT_D * fm.d + ACT_M * fm.m))
        layers, ca = self._layers(keys, ca_nv)
        self._overhead(cost, layers * LAUNCHES_PREFILL_LAYER + ca * LAUNCHES_CA + LAUNCHES_PREFILL_FIXED
                       + (LAUNCHES_STREAMS if ca else 0))
        return self._finish(cost.scaled(BACKWARD) if backward else cost)

    def decode_step(self, keys: Sequence[int], context: int, *, batch: int = 1, ca_nv: int | None = None) -> Cost:
        """One generated token per sequence, ``context`` text tokens (itself included) before it."""
        fm, cost = self.fm, Cost()
        self._price(fm.decode_ops(keys, context, batch=batch, ca_nv=ca_nv), cost, decode=True)
        cached = sum(context - 1 + v for v in keys)  # keys already in each layer's cache
        self._memory(cost, batch * len(keys) * (ACT_D * fm.d + ACT_M * fm.m))
        if self.cat_appends:  # torch.cat copies the whole cache: a plain copy once the allocator has settled
            self._memory(cost, batch * 2 * cached * 2 * fm.d_kv, copy=True)
        layers, ca = self._layers(keys, ca_nv)
        if self.decode_launches:
            self._overhead(cost, layers * LAUNCHES_DECODE_LAYER + ca * LAUNCHES_CA + LAUNCHES_DECODE_FIXED)
        return self._finish(cost)

    def _finish(self, cost: Cost) -> Cost:
        if self.profile.device == "cuda":
            cost.overlap_launches()
        return cost

    def decode(self, keys: Sequence[int], nt: int, steps: int, *, batch: int = 1, ca_nv: int | None = None) -> Cost:
        """Mean cost per generated token over ``steps`` tokens after a prompt of ``nt`` text tokens."""
        return Cost.mean([self.decode_step(keys, nt + t, batch=batch, ca_nv=ca_nv) for t in range(1, steps + 1)])

    def train_step(self, keys: Sequence[int], nt: int, *, batch: int, trainable_params: int,
                   ca_nv: int | None = None) -> Cost:
        """Forward (loss on every text token), its backward (``BACKWARD``), and one AdamW step."""
        cost = self.prefill(keys, nt, batch=batch, ca_nv=ca_nv, head_rows=nt)
        cost.merge(self.prefill(keys, nt, batch=batch, ca_nv=ca_nv, head_rows=nt, backward=True))
        cost.add("optimizer", trainable_params * self.profile.adamw_s_per_param)
        return cost

    # ---- helpers for the benches ------------------------------------------------------------------------
    def weight_params(self, with_ca: bool, embedding: bool = True, tied: bool = False) -> int:
        """LLM matrix parameters: every layer's projections and MLP, the LM head, the embedding (unless left out,
        or ``tied`` to the head) and, for VISOR, the CA blocks. Norm weights and biases are left out."""
        fm = self.fm
        per_layer = 2 * fm.d * fm.d + 2 * fm.d * fm.d_kv + 3 * fm.d * fm.m
        ca = len(fm.schedule.ca_layers) * (2 * fm.d * fm.d + 2 * fm.d * fm.d_kv) if with_ca else 0
        return fm.L * per_layer + (1 if tied or not embedding else 2) * fm.vocab * fm.d + ca


__all__ = ["Cost", "CostModel"]
