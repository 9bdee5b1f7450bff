"""``visor bench prefill`` and ``visor bench decode``: measured speed-up against the analytic FLOPs ratio.

One run times the dense host model and every feasible VISOR configuration (and, with ``--fastv K``, FastV at the
FLOPs of each configuration) on the same random-weight LLM, same inputs, same threads, interleaved round by
round so machine noise hits every row alike. Per row: median time, measured speed-up vs dense, the FLOPs
model's ratio, and their quotient ``measured_over_analytic`` (1.0 = the FLOPs saving turns fully into time).
The vision tower is not timed: it is the same for every row and counted apart by the FLOPs model.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from visor_lightning.costmodel import CostModel
from visor_lightning.devprofile import DeviceProfile, get_profile
from visor_lightning.flops import FlopsModel, Workload
from visor_lightning.models.fastv import FastVConfig, fastv_prefill
from visor_lightning.models.schedule import LayerSchedule, config_name

PROMPT_BEFORE = 14  # text tokens in front of the image (system prompt + user turn start), the rest follow it


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The benches' defaults: CUDA when present, in bf16 there and fp32 on a CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def speed_probe(prof: DeviceProfile, d: int, m: int, dev: torch.device, dt: torch.dtype,
                timer: Callable[[Callable[[], Any]], float]) -> Callable[[], float]:
    """A 256-row GEMM of the model's MLP shape, timed before every round: its throughput over the profile's at the
    same point says how fast the (shared) machine runs now compared to when the profile was measured."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(m, d, generator=g).to(dev, dt), torch.randn(256, d, generator=g).to(dev, dt)
    ref = prof.gemm_flops(256, d, m)

    def probe() -> float:
        t = statistics.median(timer(lambda: torch.nn.functional.linear(x, w)) for _ in range(5))
        return 2 * 256 * d * m / t / ref

    return probe


def build_lms(section, device: torch.device, dtype: torch.dtype):
    """The host LLM (random Qwen2 of the config's shapes) under the VISOR schedule and under the dense one;
    both share the same decoder layers, so every row runs the same weights."""
    from transformers import Qwen2Model

    from visor_lightning.models.visor_lm import VisorLanguageModel

    cfg = section.backbone.to_hf_config().text_config
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    host = Qwen2Model(cfg)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    visor = VisorLanguageModel(host, head, section.schedule)
    dense = VisorLanguageModel(host, head, LayerSchedule.dense(section.schedule.num_layers))
    return visor.to(device, dtype).eval(), dense.to(device, dtype).eval()


def make_inputs(d: int, nt: int, nv: int, batch: int, device: torch.device, dtype: torch.dtype):
    """Random embeddings [B, nt + nv, d] laid out text(14) | image(nv) | text(rest), all rows full length."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(batch, nt + nv, d, generator=g).mul(0.5).to(device, dtype)
    is_vis = torch.zeros(batch, nt + nv, dtype=torch.bool)
    before = min(PROMPT_BEFORE, nt - 1)
    is_vis[:, before : before + nv] = True
    mask = torch.ones(batch, nt + nv, dtype=torch.long)
    return emb, is_vis.to(device), mask.to(device)


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    return run


def run_bench(kind: str, section, work: Workload, *, batch: int = 1, repeats: int = 5, warmup: int = 1,
              fastv_layer: int | None = None, device: str | None = None, dtype: str | None = None,
              progress: bool = True, profile: DeviceProfile | None = None) -> dict[str, Any]:
    """Time ``kind`` ('prefill' or 'decode') for dense, every feasible configuration and optional FastV rows, and
    predict each row's time with the cost model on ``profile`` (default: this machine's, measured once, cached)."""
    from visor_lightning.models.cache import VisorCache

    if kind not in ("prefill", "decode"):
        raise ValueError(f"bench kind must be prefill or decode, got {kind!r}")
    dev, dt = resolve_device(device, dtype)
    spec, sch = section.backbone, section.schedule
    nt, nv = work.text_tokens, work.resolve_visual(spec)
    nv_dense = work.resolve_visual(replace(spec, token_pool=1))  # VISOR-TR rows race the unpooled dense model
    visor, dense = build_lms(section, dev, dt)
    fm = FlopsModel(spec, sch, section.policy_width)
    emb, is_vis, mask = make_inputs(spec.text.hidden_size, nt, nv, batch, dev, dt)
    emb_d, is_vis_d, mask_d = make_inputs(spec.text.hidden_size, nt, nv_dense, batch, dev, dt)
    steps = work.decode_tokens
    bpe = torch.empty((), dtype=dt).element_size()  # visual-KV bytes are priced at the dtype that runs

    # rows: name, SA layers, prefill(cache) -> logits, analytic prefill / decode-per-token FLOPs, visual KV bytes,
    # and the per-layer visual keys (+ CA visual tokens) the cost model prices and the decode cache is filled with
    rows: list[dict[str, Any]] = [dict(config="dense", sa="all", run=lambda c: dense(emb_d, is_vis_d, mask_d, cache=c, last_only=True).logits,
                                       prefill=fm.prefill(None, nt, nv_dense), decode=fm.decode(None, nt, nv_dense, steps),
                                       kv=fm.visual_kv_bytes(None, nv_dense, bpe), lm=dense,
                                       keys=fm.visual_keys(None, nv_dense), ca_nv=None, cid=dense.schedule.full_config, nv=nv_dense)]
    for cid, active in enumerate(sch.feasible):
        ids = torch.full((batch,), cid, device=dev)
        rows.append(dict(config=config_name(active), sa=len(active),
                         run=lambda c, ids=ids: visor(emb, is_vis, mask, config_ids=ids, cache=c, last_only=True).logits,
                         prefill=fm.prefill(active, nt, nv, routed=False), decode=fm.decode(active, nt, nv, steps),
                         kv=fm.visual_kv_bytes(active, nv, bpe), lm=visor,
                         keys=fm.visual_keys(active, nv), ca_nv=nv, cid=cid, nv=nv))
    if fastv_layer is not None:
        dense_fm = FlopsModel(spec, LayerSchedule.dense(sch.num_layers))
        for active in sch.feasible:
            r = dense_fm.fastv_ratio_for(fm.prefill(active, nt, nv, routed=False), [(nt, nv)], fastv_layer)
            cfg = FastVConfig(fastv_layer, r)
            rows.append(dict(config=f"{cfg.name} ~ {config_name(active)}", sa="all, pruned",
                             run=lambda c, cfg=cfg: fastv_prefill(dense, emb, is_vis, mask, cfg, c)[0],
                             prefill=dense_fm.fastv_prefill(nt, nv, fastv_layer, r),
                             decode=dense_fm.fastv_decode(nt, nv, fastv_layer, r, steps),
                             kv=dense_fm.fastv_visual_kv_bytes(nv, fastv_layer, r, bpe),
                             lm=dense, keys=dense_fm.fastv_keys(nv, fastv_layer, r), ca_nv=None, cid=None, nv=nv))

    prof = profile or get_profile(dev.type, str(dt).removeprefix("torch."), progress=(print if progress else None))
    cm = CostModel(fm, prof, bpe)
    for r in rows:
        if kind == "prefill":
            r["predicted"] = cm.prefill(r["keys"], nt, batch=batch, ca_nv=r["ca_nv"])
        else:
            r["predicted"] = cm.decode(r["keys"], nt, steps, batch=batch, ca_nv=r["ca_nv"])

    timer = _timer(dev)
    nxt = torch.zeros(batch, dtype=torch.long, device=dev)
    t_cfg = spec.text

    def once(row: dict[str, Any]) -> float:
        if kind == "prefill":
            return timer(lambda: row["run"](None))
        # the cache B prefills would leave, filled directly: decode at batch 32 costs seconds, not 32 prefills.
        # It is filled one text token short and completed by an untimed step, which also settles the allocator
        # for this row's shapes (the row after dense otherwise pays for the memory dense just released)
        lm = row["lm"]
        cache = VisorCache.filled(row["keys"], nt - 1, batch, kv_heads=t_cfg.num_kv_heads, head_dim=t_cfg.head_dim,
                                  ca_layers=tuple(int(l) for l in lm.ca_blocks), visual=row["nv"],
                                  dtype=dt, device=dev, config_id=row["cid"])
        lm.decode_step(nxt, cache)
        text_bytes = batch * sch.num_layers * nt * 2 * fm.d_kv * bpe  # every layer caches the text keys
        row["measured_kv"] = (cache.nbytes() - text_bytes) // batch
        return timer(lambda: [lm.decode_step(nxt, cache) for _ in range(steps)]) / steps

    times: dict[str, list[float]] = {r["config"]: [] for r in rows}
    probe = speed_probe(prof, spec.text.hidden_size, spec.text.intermediate_size, dev, dt, timer)
    speeds: list[float] = []
    with torch.inference_mode():
        for rnd in range(warmup + repeats):
            speeds.append(probe())
            for r in rows:
                t = once(r)
                if rnd >= warmup:
                    times[r["config"]].append(t)
            if progress:
                print(f"[visor bench {kind}] round {rnd + 1}/{warmup + repeats} ({'warm-up' if rnd < warmup else 'timed'})", flush=True)

    base_t = statistics.median(times["dense"])
    key = "prefill" if kind == "prefill" else "decode"
    out_rows = []
    for r in rows:
        t = statistics.median(times[r["config"]])
        speedup = base_t / t
        analytic = rows[0][key] / r[key]
        pred = r["predicted"]
        row = dict(config=r["config"], sa_layers=r["sa"], median_ms=1e3 * t, min_ms=1e3 * min(times[r["config"]]),
                   measured_speedup=speedup, analytic_ratio=analytic, measured_over_analytic=speedup / analytic,
                   analytic_gflops=r[key] / 1e9, predicted_ms=pred.ms, measured_over_predicted=1e3 * t / pred.ms,
                   min_over_predicted=min(times[r["config"]]) / pred.seconds,
                   predicted_parts_ms={k: 1e3 * v for k, v in pred.parts.items()})
        if kind == "decode":
            row.update(tokens_per_s=batch / t, visual_kv_bytes=r["kv"], measured_visual_kv_bytes=r["measured_kv"])
        out_rows.append(row)
    return dict(kind=kind, device=str(dev), dtype=str(dt).removeprefix("torch."), threads=torch.get_num_threads(),
                profile=prof.describe(), machine_speed_vs_profile=statistics.median(speeds), machine_speed_by_round=speeds,
                batch=batch, repeats=repeats, text_tokens=nt, visual_tokens=nv, dense_visual_tokens=nv_dense,
                token_pool=spec.token_pool, decode_tokens=steps,
                schedule=sch.describe(), rows=out_rows)


def markdown(res: dict[str, Any]) -> str:
    dec = res["kind"] == "decode"
    head = "| config | SA layers | median ms" + ("/token | tokens/s | visual KV MiB" if dec else "") + \
           " | predicted ms | measured / predicted | min / predicted | measured speed-up | analytic FLOPs ratio | measured / analytic |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        extra = f" | {r['tokens_per_s']:.1f} | {r['visual_kv_bytes'] / 2**20:.2f}" if dec else ""
        lines.append(f"| {r['config']} | {r['sa_layers']} | {r['median_ms']:.2f}{extra} | {r['predicted_ms']:.2f} | "
                     f"{r['measured_over_predicted']:.2f} | {r['min_over_predicted']:.2f} | {r['measured_speedup']:.2f}x | "
                     f"{r['analytic_ratio']:.2f}x | {r['measured_over_analytic']:.2f} |")
    worst = max(res["rows"], key=lambda r: abs(r["measured_over_predicted"] - 1))
    worst_min = max(res["rows"], key=lambda r: abs(r["min_over_predicted"] - 1))
    lines.append(f"\nworst measured / predicted: {worst['measured_over_predicted']:.2f} ({worst['config']}); worst min / "
                 f"predicted: {worst_min['min_over_predicted']:.2f} ({worst_min['config']}); "
                 f"profile: {res['profile']}; the machine ran at {res['machine_speed_vs_profile']:.2f}x the profile's "
                 "speed (a 256-row GEMM timed each round)")
    return "\n".join(lines)


def bench_spec_note(res: dict[str, Any]) -> str:
    return (f"{res['kind']} on {res['device']} ({res['dtype']}, {res['threads']} threads), batch {res['batch']}, "
            f"{res['text_tokens']} text + {res['visual_tokens']} visual tokens"
            + (f" (VISOR-TR pooling {res['token_pool']}x; dense: {res['dense_visual_tokens']})" if res["token_pool"] != 1 else "")
            + (f", {res['decode_tokens']} decode steps after the prefill" if res["kind"] == "decode" else "")
            + f", median of {res['repeats']} rounds; schedule {res['schedule']}")


__all__ = ["bench_spec_note", "build_lms", "markdown", "resolve_device", "run_bench"]
