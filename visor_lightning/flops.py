"""The one analytic FLOPs / KV-memory model. Logs, benchmarks, ``visor flops`` and tests all use this file.

Convention (FastV Eq. 5, as used by PyramidDrop and others), counted as FLOPs = 2 x multiply-accumulates over
matrix products only (norms, activations, RoPE and softmax are left out, as torch's FlopCounterMode does).
With d = hidden size, d_kv = kv_heads x head_dim (GQA), m = FFN width, V = vocabulary:

    proj(n)        = 2 n (2 d^2 + 2 d d_kv)          q, k, v, o projections
    attn(nq, nk)   = 4 nq nk d                       QK^T and AV, every head, full (not causal-halved) matrix
    mlp(n)         = 6 n d m                         SwiGLU: gate, up, down
    layer(n)       = proj(n) + attn(n, n) + mlp(n)   one host decoder layer over n tokens
    ca(nt, nv)     = 2 (2 nt d^2 + 2 nv d d_kv) + attn(nt, nv)     one VISOR cross-attention block

Prefill of the LLM with Nt text and Nv visual tokens, for a configuration with active SA set A:

    dense  = L * layer(Nt + Nv)
    VISOR  = sum_{l in A} layer(Nt + Nv) + sum_{l not in A} layer(Nt) + |L_CA| * ca(Nt, Nv) + policy

plus the LM head on the last token (2 d V) for both. The code builds these sums op by op (``layer_ops``, ``ca_ops``,
``prefill_ops``, ``decode_ops``: every matrix product with its shape), so the cost model (``costmodel.py``) prices
exactly the products counted here. The vision encoder (SigLIP up to the feature layer) and the
connector are counted separately: they are the same for dense and VISOR. Decoding one token at step t (its
context Nt + t text tokens) costs proj(1) + attn(1, keys) + mlp(1) per layer, keys being Nt + t (+ Nv in SA
layers and the dense model), plus per CA layer 4 d^2 + attn(1, Nv) (visual K/V are cached), plus 2 d V.
Visual KV-cache bytes = Nv x (number of layers holding visual K/V) x 2 d_kv x bytes per element.

FastV-style pruning (the peer, ``models/fastv.py``) on the dense model, dropping ratio R after layer K:

    FastV  = K * layer(Nt + Nv) + (L - K) * layer(Nt + keep(Nv, R))      keep(Nv, R) = Nv - round(R Nv)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from .models.fastv import fastv_keep
from .models.schedule import LayerSchedule, config_name
from .models.spec import BackboneSpec


@dataclass
class Workload:
    """Token counts the FLOPs are quoted for. Defaults: a square image in LLaVA-OV's 2x2 AnyRes grid."""

    text_tokens: int = 64
    visual_tokens: int | None = None  # None: from ``grid`` with LLaVA-OV's AnyRes packing
    grid: tuple[int, int] = (2, 2)
    decode_tokens: int = 16
    bytes_per_element: int = 2  # bf16 KV cache

    def resolve_visual(self, spec: BackboneSpec) -> int:
        """Visual tokens LLaVA-OV makes for a square image tiled ``grid``: base crop + tiles + one newline per row."""
        if self.visual_tokens is not None:
            return self.visual_tokens
        g = spec.vision.image_size // spec.vision.patch_size
        gh, gw = self.grid
        return spec.packed_tokens(gh * g, gw * g)

    @property
    def crops(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Op:
    """One matrix product of a forward pass over a whole batch, at the shape the cost model prices it at.

    ``gemm``: [rows, k] x [k, n]. ``attn``: ``batch`` sequences, ``rows`` queries each over ``keys`` keys
    (QK^T and AV of every head). ``block`` says whose it is: host (a decoder layer), ca, head, policy.
    """

    name: str
    kind: str
    flops: int
    rows: int
    k: int = 0
    n: int = 0
    keys: int = 0
    batch: int = 1
    block: str = "host"


def total_flops(ops: Sequence[Op]) -> int:
    return sum(o.flops for o in ops)


class FlopsModel:
    """Analytic counts for one backbone and schedule."""

    def __init__(self, spec: BackboneSpec, schedule: LayerSchedule, policy_width: int = 256) -> None:
        self.spec, self.schedule, self.policy_width = spec, schedule, policy_width
        t = spec.text
        self.d, self.m, self.vocab, self.L = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_layers
        self.d_kv = t.num_kv_heads * t.head_dim
        self._memo: dict[tuple, int] = {}  # evaluation asks the same (configuration, token counts) per sample

    # ---- building blocks ----------------------------------------------------------------------------
    def attn(self, nq: int, nk: int, d: int | None = None) -> int:
        return 4 * nq * nk * (d or self.d)

    def lm_head(self, n: int = 1) -> int:
        return 2 * n * self.d * self.vocab

    # ---- the same counts, op by op (what ``costmodel.py`` prices) ---------------------------------------
    @staticmethod
    def _gemm(name: str, rows: int, k: int, n: int, block: str = "host") -> Op:
        return Op(name, "gemm", 2 * rows * k * n, rows, k, n, block=block)

    def layer_ops(self, l: int, batch: int, n: int, keys: int) -> list[Op]:
        """Host layer ``l``: ``n`` new tokens per sequence attending over ``keys``. Sums to proj + attn + mlp."""
        d, kv, m, r, g = self.d, self.d_kv, self.m, batch * n, self._gemm
        return [g(f"{l}.q", r, d, d), g(f"{l}.k", r, d, kv), g(f"{l}.v", r, d, kv),
                Op(f"{l}.attn", "attn", batch * self.attn(n, keys), n, keys=keys, batch=batch),
                g(f"{l}.o", r, d, d), g(f"{l}.gate", r, d, m), g(f"{l}.up", r, d, m), g(f"{l}.down", r, m, d)]

    def ca_ops(self, l: int, batch: int, nt: int, nv: int, decode: bool = False) -> list[Op]:
        """CA block before layer ``l``: q/o over the text, k/v over the visual tokens (not when decoding: cached)."""
        d, kv, g = self.d, self.d_kv, self._gemm
        kvs = [] if decode else [g(f"{l}.ca.k", batch * nv, d, kv, "ca"), g(f"{l}.ca.v", batch * nv, d, kv, "ca")]
        return [g(f"{l}.ca.q", batch * nt, d, d, "ca"), *kvs,
                Op(f"{l}.ca.attn", "attn", batch * self.attn(nt, nv), nt, keys=nv, batch=batch, block="ca"),
                g(f"{l}.ca.o", batch * nt, d, d, "ca")]

    def policy_ops(self, batch: int) -> list[Op]:
        if self.schedule.router_layer is None:
            return []
        w, c = self.policy_width, len(self.schedule.feasible)
        return [self._gemm("policy.in", batch, 2 * self.d, w, "policy"), self._gemm("policy.out", batch, w, c, "policy")]

    def prefill_ops(self, keys: Sequence[int], nt: int, *, batch: int = 1, ca_nv: int | None = None,
                    routed: bool = False, head_rows: int = 1) -> list[Op]:
        """A prefill whose layer l runs over nt + keys[l] tokens; ``ca_nv`` adds the CA blocks (VISOR) over that
        many visual tokens; ``head_rows`` LM-head rows per sequence (1: the last token; nt when training)."""
        ops: list[Op] = []
        ca = set(self.schedule.ca_layers) if ca_nv is not None else set()
        for l, v in enumerate(keys):
            if l in ca:
                ops += self.ca_ops(l, batch, nt, ca_nv)
            ops += self.layer_ops(l, batch, nt + v, nt + v)
        if routed:
            ops += self.policy_ops(batch)
        return ops + [self._gemm("lm_head", batch * head_rows, self.d, self.vocab, "head")]

    def decode_ops(self, keys: Sequence[int], context: int, *, batch: int = 1, ca_nv: int | None = None) -> list[Op]:
        """One generated token per sequence whose text context (itself included) is ``context`` tokens long."""
        ops: list[Op] = []
        ca = set(self.schedule.ca_layers) if ca_nv is not None else set()
        for l, v in enumerate(keys):
            if l in ca:
                ops += self.ca_ops(l, batch, 1, ca_nv, decode=True)
            ops += self.layer_ops(l, batch, 1, context + v)
        return ops + [self._gemm("lm_head", batch, self.d, self.vocab, "head")]

    # ---- totals -------------------------------------------------------------------------------------
    def vision(self, crops: int) -> int:
        """SigLIP up to the feature layer: patch conv + encoder layers, per crop."""
        v = self.spec.vision
        p = v.tokens_per_crop
        used = v.feature_layer if v.feature_layer >= 0 else v.num_layers + 1 + v.feature_layer
        patch = 2 * p * v.hidden_size * v.num_channels * v.patch_size**2
        layer = 2 * p * 4 * v.hidden_size**2 + self.attn(p, p, v.hidden_size) + 2 * 2 * p * v.hidden_size * v.intermediate_size
        return crops * (patch + used * layer)

    def connector(self, crops: int, nv: int) -> int:
        """2-layer MLP projector on every crop token + depthwise conv (kernel 7) on the packed visual tokens."""
        p = self.spec.vision.tokens_per_crop
        return 2 * crops * p * (self.spec.vision.hidden_size * self.d + self.d * self.d) + 2 * nv * self.d * 7

    # ---- per-layer visual keys: the one shape every total below is built from ---------------------------
    def visual_keys(self, active: Sequence[int] | None, nv: int) -> list[int]:
        """Visual tokens each LLM layer attends over: all of them in the dense model, ``nv`` in active SA layers
        and none elsewhere for a VISOR configuration."""
        act = set(range(self.L)) if active is None else set(active)
        return [nv if l in act else 0 for l in range(self.L)]

    def fastv_keys(self, nv: int, layer: int, ratio: float) -> list[int]:
        """FastV: every visual token before ``layer``, the kept ones from it on."""
        return [nv] * layer + [fastv_keep(nv, ratio)] * (self.L - layer)

    def _decode_mean(self, nt: int, keys: Sequence[int], steps: int, ca_nv: int | None = None) -> float:
        """Mean FLOPs per generated token: per layer proj + mlp + attention over context and visual keys."""
        total = sum(total_flops(self.decode_ops(keys, nt + t, ca_nv=ca_nv)) for t in range(1, steps + 1))
        return total / max(steps, 1)

    def prefill(self, active: Sequence[int] | None, nt: int, nv: int, routed: bool = True) -> int:
        """LLM prefill FLOPs (LM head on the last token included). ``active=None`` means the dense host model.

        ``routed=False`` leaves out the policy MLP, for a configuration forced by the caller.
        """
        routed = routed and active is not None
        key = ("prefill", None if active is None else tuple(active), nt, nv, routed)
        if key not in self._memo:
            ops = self.prefill_ops(self.visual_keys(active, nv), nt, ca_nv=None if active is None else nv,
                                   routed=routed)
            self._memo[key] = total_flops(ops)
        return self._memo[key]

    def fastv_prefill(self, nt: int, nv: int, layer: int, ratio: float) -> int:
        """Dense prefill with FastV pruning: ``ratio`` of the visual tokens dropped from layer ``layer`` on."""
        key = ("fastv", nt, nv, layer, ratio)
        if key not in self._memo:
            self._memo[key] = total_flops(self.prefill_ops(self.fastv_keys(nv, layer, ratio), nt))
        return self._memo[key]

    def fastv_ratio_for(self, target: float, tokens: Sequence[tuple[float, float]], layer: int) -> float:
        """The FastV drop ratio whose mean prefill FLOPs over the ``tokens`` workloads ((text, visual) counts,
        rounded to whole tokens) come nearest ``target``: the matched-FLOPs peer of a VISOR configuration."""
        work = [(round(nt), max(1, round(nv))) for nt, nv in tokens]
        ratios = sorted({1 - k / nv for _, nv in work for k in range(nv + 1)})
        return min(ratios, key=lambda r: abs(self.fastv_mean_prefill(work, layer, r) - target))

    def fastv_mean_prefill(self, tokens: Sequence[tuple[float, float]], layer: int, ratio: float) -> float:
        """Mean FastV prefill FLOPs over the ``tokens`` workloads, rounded to whole tokens as ``fastv_ratio_for``
        does (``ratio`` 1: the cheapest FastV gets at ``layer``)."""
        work = [(round(nt), max(1, round(nv))) for nt, nv in tokens]
        return sum(self.fastv_prefill(nt, nv, layer, ratio) for nt, nv in work) / len(work)

    def fastv_decode(self, nt: int, nv: int, layer: int, ratio: float, steps: int) -> float:
        """Mean FastV decode FLOPs per token: every visual key before ``layer``, the kept ones after."""
        return self._decode_mean(nt, self.fastv_keys(nv, layer, ratio), steps)

    def fastv_visual_kv_bytes(self, nv: int, layer: int, ratio: float, bytes_per_element: int = 2) -> int:
        return sum(self.fastv_keys(nv, layer, ratio)) * 2 * self.d_kv * bytes_per_element

    def decode(self, active: Sequence[int] | None, nt: int, nv: int, steps: int) -> float:
        """Mean FLOPs per generated token over ``steps`` decode steps after the prefill (CA blocks read the visual
        K/V cached once per image: 4 d^2 + attn(1, Nv) each)."""
        return self._decode_mean(nt, self.visual_keys(active, nv), steps, None if active is None else nv)

    def visual_kv_bytes(self, active: Sequence[int] | None, nv: int, bytes_per_element: int = 2) -> int:
        layers = self.L if active is None else len(set(active)) + len(self.schedule.ca_layers)
        return nv * layers * 2 * self.d_kv * bytes_per_element

    def table(self, work: Workload) -> list[dict]:
        """One row for the dense model, then one per feasible configuration."""
        nt, nv = work.text_tokens, work.resolve_visual(self.spec)
        nv_dense = work.resolve_visual(replace(self.spec, token_pool=1))  # VISOR-TR is priced against unpooled dense
        dense_pre = self.prefill(None, nt, nv_dense)
        dense_dec = self.decode(None, nt, nv_dense, work.decode_tokens)
        dense_vis = self.vision(work.crops) + self.connector(work.crops, nv_dense)
        rows = []
        for name, active in [("dense", None)] + [(config_name(c), c) for c in self.schedule.feasible]:
            n = nv_dense if active is None else nv
            vis = self.vision(work.crops) + self.connector(work.crops, n)
            pre = self.prefill(active, nt, n)
            dec = self.decode(active, nt, n, work.decode_tokens)
            rows.append(
                dict(
                    config=name,
                    sa_layers=None if active is None else len(active),
                    text_tokens=nt,
                    visual_tokens=n,
                    prefill_flops=pre,
                    prefill_saving=dense_pre / pre,
                    prefill_with_vision_saving=(dense_pre + dense_vis) / (pre + vis),
                    decode_flops_per_token=dec,
                    decode_saving=dense_dec / dec,
                    visual_kv_bytes=self.visual_kv_bytes(active, n, work.bytes_per_element),
                    vision_flops=vis,
                )
            )
        return rows


def token_counts(ids: Any, mask: Any, image_token_id: int) -> tuple[list[int], list[int]]:
    """(text tokens, visual tokens) per sample of a padded [B, N] batch: what every per-sample price is quoted at."""
    vis = ids == image_token_id
    return ((~vis) & mask.bool()).sum(1).tolist(), vis.sum(1).tolist()


def _unit(value: float, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest unit in which ``value`` is at least 1 (a tiny model's prefill is not "0.000 TFLOPs")."""
    for name, scale in units:
        if value >= scale:
            return name, scale
    return units[-1]


FLOP_UNITS = (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3))
BYTE_UNITS = (("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))


def format_table(rows: list[dict]) -> str:
    """Markdown table of :meth:`FlopsModel.table` rows; each column's unit is chosen by the dense row (the largest)."""
    p_name, p_scale = _unit(max(r["prefill_flops"] for r in rows), FLOP_UNITS)
    d_name, d_scale = _unit(max(r["decode_flops_per_token"] for r in rows), FLOP_UNITS)
    k_name, k_scale = _unit(max(r["visual_kv_bytes"] for r in rows), BYTE_UNITS)
    head = (f"| config | SA | prefill {p_name} | saving | saving incl. vision | decode {d_name}/tok | decode saving "
            f"| visual KV {k_name} |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['config']} | {'all' if r['sa_layers'] is None else r['sa_layers']} | {r['prefill_flops'] / p_scale:.3f} "
            f"| {r['prefill_saving']:.2f}x | {r['prefill_with_vision_saving']:.2f}x | {r['decode_flops_per_token'] / d_scale:.3f} "
            f"| {r['decode_saving']:.2f}x | {r['visual_kv_bytes'] / k_scale:.1f} |"
        )
    return "\n".join(lines)


def workload_dict(work: Workload, spec: BackboneSpec) -> dict:
    d = asdict(work)
    d["visual_tokens"] = work.resolve_visual(spec)
    d["crops"] = work.crops
    return d
