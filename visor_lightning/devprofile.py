"""Device profiles: what one machine does per second, measured (``visor bench profile``) or assumed (datasheets).

The cost model (``costmodel.py``) prices every matrix product of the FLOPs model with these numbers, so a profile
holds exactly what that needs and nothing else:

* ``gemm``: FLOP/s of ``x @ W`` as a function of the row count M, for each weight shape (K, N) measured. CPU BLAS
  (and GPUs at small M) run few-row products far below peak, which is why a cheap configuration's 64-token
  text-only layers do not run at the speed of a 1,549-token SA layer.
* ``sdpa``: FLOP/s of ``scaled_dot_product_attention`` with a boolean mask (as VISOR calls it), by total work
  B x nq x nk (prefill, nq > 1), and ``sdpa_decode`` for one query row, by B x nk.
* ``bandwidth``: bytes/s of a large copy (read + write counted): weights and K/V streaming, cache appends.
* ``elementwise``: bytes/s of ``silu(x) * y`` over a large tensor (read + write counted): norms, RoPE, activations
  and residuals, which on a CPU run well below copy bandwidth.
* ``op_overhead_s``: the fixed cost of one small framework op (dispatch on CPU, launch on GPU); decoding at
  batch 1 runs thousands of them per token.
* ``adamw_s_per_param``: one ``torch.optim.AdamW`` step over 32M parameters in 1M-element tensors, per parameter.

Profiles are cached as JSON per machine, device and dtype under ``$VISOR_PROFILE_DIR`` (default
``~/.cache/visor/profiles``). A datasheet profile (``assumed: true``) flat-lines every table at the vendor's peak.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

FORMAT_VERSION = 1

# vendor peaks: dense bf16 tensor-core FLOP/s (no sparsity), HBM bytes/s, memory bytes
DATASHEETS: dict[str, dict[str, float]] = {
    "h100-sxm": dict(flops=989e12, bandwidth=3.35e12, memory=80e9),
    "h200-sxm": dict(flops=989e12, bandwidth=4.8e12, memory=141e9),
    "a100-sxm-80gb": dict(flops=312e12, bandwidth=2.039e12, memory=80e9),
}
GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # M values timed (decode batches, text, SA layers)
POOL_BYTES = 256 * 2**20  # larger than any last-level cache: weights timed cold, as a forward pass meets them
ADAMW_ASSUMED_BYTES = 32  # per parameter: fp32 master weight, grad, two moments read, three written, bf16 copy
ASSUMED_OP_OVERHEAD_S = 6e-6  # one eager CUDA kernel launch (assumed; CUDA graphs would remove most of it)

Table = list[list[float]]  # [[x, flop_per_s], ...] sorted by x


@dataclass
class DeviceProfile:
    name: str  # machine / GPU name
    device: str  # cpu, cuda
    dtype: str  # float32, bfloat16, ...
    threads: int  # torch threads when measured (CPU)
    assumed: bool  # True: datasheet numbers, not measured here
    bandwidth: float  # bytes/s, copy (read + write both counted)
    elementwise: float  # bytes/s of silu(x) * y (read + write counted)
    op_overhead_s: float  # seconds per small op
    adamw_s_per_param: float  # one torch.optim.AdamW step (foreach), seconds per parameter
    gemm: dict[str, Table] = field(default_factory=dict)  # "KxN" -> [[M, FLOP/s], ...]
    sdpa: Table = field(default_factory=list)  # [[B*nq*nk, FLOP/s], ...] for nq > 1
    sdpa_decode: Table = field(default_factory=list)  # [[B*nk, FLOP/s], ...] for one query row
    memory_bytes: float | None = None  # device memory (GPU datasheets), for ``visor bench serve``
    head_dim: int = 64  # the attention head width SDPA was measured at
    measured_at: str = ""
    seconds: float = 0.0  # how long the measurement took
    version: int = FORMAT_VERSION

    # ---- lookups --------------------------------------------------------------------------------------
    def gemm_flops(self, m: int, k: int, n: int) -> float:
        """FLOP/s for an [m, k] x [k, n] product: the measured shape nearest (k, n) in log space, at M interpolated."""
        if not self.gemm:
            raise ValueError(f"profile {self.name!r} has no gemm table")

        def dist(key: str) -> float:
            kk, nn = (int(x) for x in key.split("x"))
            return abs(math.log(kk / k)) + abs(math.log(nn / n))

        # a shape measured only at small M (a big LM head on a slow device) does not extrapolate to large M
        covering = [key for key, t in self.gemm.items() if max(x for x, _ in t) >= m] or list(self.gemm)
        return interpolate(self.gemm[min(covering, key=dist)], m)

    def sdpa_flops(self, batch: int, nq: int, nk: int) -> float:
        if nq == 1:
            return interpolate(self.sdpa_decode, batch * nk)
        return interpolate(self.sdpa, batch * nq * nk)

    # ---- files ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "profile") -> "DeviceProfile":
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: profile format version {d.get('version')!r}, this visor reads {FORMAT_VERSION}; "
                             "measure it again with `visor bench profile --force`")
        missing = [k for k in ("name", "device", "dtype", "bandwidth", "elementwise", "op_overhead_s", "adamw_s_per_param",
                               "gemm", "sdpa", "sdpa_decode")
                   if k not in d]
        if missing:
            raise ValueError(f"{source}: profile lacks field(s) {missing}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown profile field(s) {unknown}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a JSON device profile ({e})") from None
        return cls.from_dict(d, str(p))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    def describe(self) -> str:
        tag = "ASSUMED from datasheet peaks" if self.assumed else f"measured {self.measured_at} in {self.seconds:.0f} s"
        peak = max(v for t in self.gemm.values() for _, v in t)
        return (f"{self.name} {self.device} {self.dtype} ({tag}): GEMM up to {peak / 1e9:.0f} GFLOP/s, "
                f"bandwidth {self.bandwidth / 1e9:.1f} GB/s (elementwise {self.elementwise / 1e9:.1f}), "
                f"{self.op_overhead_s * 1e6:.1f} us per op")


def interpolate(table: Sequence[Sequence[float]], x: float) -> float:
    """Piecewise-linear in log(x), flat beyond the measured ends."""
    if not table:
        raise ValueError("empty profile table")
    pts = sorted(table)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]  # unreachable


def nondecreasing(table: Table) -> Table:
    """Least-squares non-decreasing fit (pool adjacent violators) of [x, rate] points sorted by x.

    More rows (or more attention work) never make a kernel slower per FLOP; a measured dip is the shared machine's
    noise, and fitting the shape rather than trusting each point keeps one noisy repetition out of every prediction.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for _, y in table:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    fitted = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [[x, y] for (x, _), y in zip(table, fitted)]


def datasheet_profile(name: str, dtype: str = "bfloat16") -> DeviceProfile:
    """A GPU profile from vendor peaks, labelled assumed: every table is flat at the peak (real kernels reach
    roughly 60-80% of it on large products, far less on small ones), overhead one launch per op."""
    if name not in DATASHEETS:
        raise ValueError(f"unknown datasheet GPU {name!r}; known: {', '.join(sorted(DATASHEETS))}")
    s = DATASHEETS[name]
    flat = [[1, s["flops"]], [1e12, s["flops"]]]
    return DeviceProfile(name=name, device="cuda", dtype=dtype, threads=0, assumed=True, bandwidth=s["bandwidth"],
                         elementwise=s["bandwidth"], adamw_s_per_param=ADAMW_ASSUMED_BYTES / s["bandwidth"],
                         op_overhead_s=ASSUMED_OP_OVERHEAD_S, gemm={"1x1": flat}, sdpa=flat, sdpa_decode=flat,
                         memory_bytes=s["memory"], measured_at="datasheet")


# ---- measuring ----------------------------------------------------------------------------------------
def default_path(device: str, dtype: str) -> Path:
    root = Path(os.environ.get("VISOR_PROFILE_DIR", Path.home() / ".cache" / "visor" / "profiles"))
    return root / f"{platform.node() or 'machine'}-{device}-{dtype}.json"


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float, max_reps: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up call, with as many repeats as fit ``budget_s`` (at least 2)."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < max_reps:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if len(times) >= 2 and sum(times) > budget_s:
            break
    return statistics.median(times)


def measure(device: str = "cpu", dtype: str = "float32", *, shapes: Sequence[tuple[int, int]] = ((896, 896), (896, 128), (896, 4864), (4864, 896), (896, 151936)),
            heads: int = 14, kv_heads: int = 2, head_dim: int = 64, budget_s: float = 30.0,
            progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """Measure a profile in about ``budget_s`` seconds: GEMM by M for each weight shape, SDPA, bandwidth, op overhead.

    The default shapes are the LLaVA-OV 0.5B LLM's (q/o, k/v, gate/up, down, LM head). Products whose FLOPs would
    take more than a share of the budget are skipped, so a slow device measures fewer large M.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(dev, dt)  # noqa: E731

    # bandwidth first: it also calibrates how many FLOPs fit the budget
    x = rand(32 * 2**20)
    y = torch.empty_like(x)
    t = _median_time(lambda: y.copy_(x), sync, 0.5)
    bandwidth = 2 * x.numel() * x.element_size() / t
    x, y = x[: 8 * 2**20], y[: 8 * 2**20]
    t = _median_time(lambda: F.silu(x) * y, sync, 0.5)
    elementwise = 5 * x.numel() * x.element_size() / t  # silu: read x, write t; mul: read t and y, write
    del x, y

    small = rand(8)
    reps = 200
    t = _median_time(lambda: [small.add(1.0) for _ in range(reps)], sync, 0.3)
    op_overhead = t / reps
    params = [torch.nn.Parameter(rand(2**20).float()) for _ in range(32)]
    for p_ in params:
        p_.grad = torch.randn_like(p_)
    opt = torch.optim.AdamW(params, lr=1e-4)
    adamw = _median_time(opt.step, sync, 1.0) / (32 * 2**20)
    del params, opt
    say(f"bandwidth {bandwidth / 1e9:.1f} GB/s (copy), {elementwise / 1e9:.1f} GB/s (elementwise), "
        f"{op_overhead * 1e6:.1f} us per op, AdamW {adamw * 1e9:.1f} ns per parameter")

    per_point = budget_s / 15  # seconds any one measured point may take
    gemm: dict[str, Table] = {}
    rate = 1e10  # FLOP/s guess until the first measurement
    # A model reads each weight (and each layer's K/V) once per pass, from memory, not from a cache that the
    # previous repetition warmed: every timed call takes the next of several copies laid out in a pool larger
    # than the last-level cache.
    pool = rand(POOL_BYTES // torch.empty((), dtype=dt).element_size())

    def copies(shape: tuple[int, ...]) -> list[Any]:
        size = math.prod(shape)
        if size * 2 > pool.numel():
            return [rand(*shape)]
        return [pool[i * size:(i + 1) * size].view(shape) for i in range(min(16, pool.numel() // size))]

    def cycling(fn: Callable[[int], Any], count: int) -> Callable[[], Any]:
        state = {"i": 0}

        def call() -> Any:
            state["i"] = (state["i"] + 1) % count
            return fn(state["i"])

        return call

    for k, n in shapes:
        ws = copies((n, k))
        pts: Table = []
        for m in GEMM_ROWS:
            flops = 2 * m * k * n
            if pts and flops / rate * 3 > per_point:
                break
            a = rand(m, k)
            t = _median_time(cycling(lambda i: F.linear(a, ws[i]), len(ws)), sync, per_point, max_reps=5)
            rate = flops / t
            pts.append([m, rate])
        gemm[f"{k}x{n}"] = nondecreasing(pts)
        say(f"gemm {k}x{n}: " + ", ".join(f"M={int(m)} {r / 1e9:.0f}" for m, r in pts) + " GFLOP/s")
        del ws

    def attn_point(b: int, nq: int, nk: int, rep_heads: int) -> float:
        q = rand(b, heads, nq, head_dim)
        kvs = copies((2, b, rep_heads, nk, head_dim))
        mask = torch.ones(nq, nk, dtype=torch.bool, device=dev).tril(nk - nq)[None, None]
        gqa = rep_heads != heads
        fn = cycling(lambda i: F.scaled_dot_product_attention(q, kvs[i][0], kvs[i][1], attn_mask=mask, enable_gqa=gqa), len(kvs))
        t = _median_time(fn, sync, per_point, max_reps=5)
        return 4 * b * nq * nk * heads * head_dim / t

    sdpa: Table = []
    for n in (64, 256, 1024, 2048, 4096):
        if sdpa and 4 * n * n * heads * head_dim / sdpa[-1][1] * 3 > per_point:
            break
        sdpa.append([n * n, attn_point(1, n, n, heads)])  # host layers repeat K/V to every head when masked
    sdpa_decode: Table = []
    for b, nk in ((1, 256), (1, 2048), (8, 2048), (32, 2048)):
        sdpa_decode.append([b * nk, attn_point(b, 1, nk, kv_heads)])
    sdpa, sdpa_decode = nondecreasing(sdpa), nondecreasing(sdpa_decode)
    say("sdpa: " + ", ".join(f"{int(math.sqrt(x))}^2 {r / 1e9:.0f}" for x, r in sdpa) + " GFLOP/s; decode "
        + ", ".join(f"{int(x)} keys {r / 1e9:.1f}" for x, r in sdpa_decode) + " GFLOP/s")

    del pool
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine() or "cpu")
    return DeviceProfile(name=f"{platform.node()}: {name}", device=dev.type, dtype=dtype,
                         threads=torch.get_num_threads() if dev.type == "cpu" else 0, assumed=False,
                         bandwidth=bandwidth, elementwise=elementwise, op_overhead_s=op_overhead, adamw_s_per_param=adamw, gemm=gemm, sdpa=sdpa, sdpa_decode=sdpa_decode,
                         memory_bytes=float(torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" else None,
                         head_dim=head_dim, measured_at=time.strftime("%Y-%m-%d %H:%M"), seconds=time.perf_counter() - t0)


def get_profile(device: str, dtype: str, path: str | None = None, *, force: bool = False,
                progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """``path`` if given (a file, or a datasheet name such as ``h100-sxm``), else this machine's cached profile,
    measured and cached on first use."""
    if path and path in DATASHEETS:
        return datasheet_profile(path, dtype)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--profile {path}: no such file and not a datasheet GPU ({', '.join(sorted(DATASHEETS))})")
        return DeviceProfile.load(path)
    p = default_path(device, dtype)
    if p.is_file() and not force:
        return DeviceProfile.load(p)
    if progress:
        progress(f"measuring the {device} {dtype} device profile (at most ~30 s, cached in {p})")
    prof = measure(device, dtype, progress=progress)
    prof.save(p)
    return prof


__all__ = ["DATASHEETS", "DeviceProfile", "datasheet_profile", "default_path", "get_profile", "interpolate", "measure"]
