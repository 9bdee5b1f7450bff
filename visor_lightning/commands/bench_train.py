"""``visor bench train``: one full training step (forward, backward, AdamW), dense full fine-tune vs the universal
stage at each configuration, measured and predicted by the cost model (backward counted).

Random weights of the config's shapes, random input embeddings (the vision tower is frozen in both and left out),
the loss on every text token (the stages take it on the answer tokens only: a few percent less LM-head work on
the demo's model), AdamW as the stages build it. Rows are interleaved round by round like ``visor bench prefill``.
The dense row trains the host LLM and LM head; a universal row also trains the CA blocks (what the optimizer
updates is counted from the gradients that exist after the step, and the cost model gets the same count).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import torch

from visor_lightning.commands.bench_model import _timer, build_lms, make_inputs, resolve_device
from visor_lightning.costmodel import CostModel
from visor_lightning.devprofile import DeviceProfile, get_profile
from visor_lightning.flops import FlopsModel, Workload
from visor_lightning.models.compiled import compile_stats
from visor_lightning.models.schedule import LayerSchedule, config_name
from visor_lightning.optim import adamw


def run_train_bench(section, work: Workload, *, batch: int = 1, repeats: int = 2, warmup: int = 1,
                    device: str | None = None, dtype: str | None = None, progress: bool = True,
                    profile: DeviceProfile | None = None, compile: bool = False) -> dict[str, Any]:
    """``compile`` adds a compiled twin of every row (same weights: a second copy of the model, its decoder
    layers and CA blocks compiled as ``model.compile`` does); its first call compiles: the graphs dynamo made in it
    and the seconds dynamo and inductor spent (with inductor's on-disk cache warm, much less than a cold compile)."""
    dev, dt = resolve_device(device, dtype)
    spec, sch = section.backbone, section.schedule
    nt, nv = work.text_tokens, work.resolve_visual(spec)
    nv_dense = work.resolve_visual(replace(spec, token_pool=1))
    fm = FlopsModel(spec, sch, section.policy_width)
    bpe = torch.empty((), dtype=dt).element_size()
    prof = profile or get_profile(dev.type, str(dt).removeprefix("torch."), progress=(print if progress else None))
    cm = CostModel(fm, prof, bpe)
    dense_cm = CostModel(FlopsModel(spec, LayerSchedule.dense(sch.num_layers)), prof, bpe)
    emb, is_vis, mask = make_inputs(spec.text.hidden_size, nt, nv, batch, dev, dt)
    emb_d, is_vis_d, mask_d = make_inputs(spec.text.hidden_size, nt, nv_dense, batch, dev, dt)
    targets = torch.randint(0, spec.text.vocab_size, (batch * nt,), generator=torch.Generator().manual_seed(2)).to(dev)

    rows: list[dict[str, Any]] = []
    for mode in ("eager", "compiled") if compile else ("eager",):
        visor, dense = build_lms(section, dev, dt)  # the same seed: both modes train the same weights
        visor.train()
        dense.train()
        if mode == "compiled":
            from visor_lightning.models.compiled import compile_lm

            compile_lm(visor)  # the dense LM shares these layers
        # one optimizer over every parameter: rows without a gradient (CA blocks in the dense row) are skipped by AdamW
        opt = adamw(visor.parameters(), lr=1e-6)
        rows.append(dict(config="dense", sa="all", mode=mode, lm=dense, owner=visor, opt=opt, inputs=(emb_d, is_vis_d, mask_d),
                         ids=None, keys=fm.visual_keys(None, nv_dense), ca_nv=None, cm=dense_cm))
        for cid, active in enumerate(sch.feasible):
            rows.append(dict(config=config_name(active), sa=len(active), mode=mode, lm=visor, owner=visor, opt=opt,
                             inputs=(emb, is_vis, mask), ids=torch.full((batch,), cid, device=dev),
                             keys=fm.visual_keys(active, nv), ca_nv=nv, cm=cm))

    def step(r: dict[str, Any]) -> None:
        out = r["lm"](*r["inputs"], config_ids=r["ids"])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets)
        loss.backward()
        r["trained"] = sum(p.numel() for p in r["owner"].parameters() if p.grad is not None and p.dim() == 2)
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)

    timer = _timer(dev)
    key = lambda r: (r["config"], r["mode"])  # noqa: E731
    times: dict[tuple[str, str], list[float]] = {key(r): [] for r in rows}
    compiled_in_first: dict[tuple[str, str], dict[str, float]] = {}  # compile_stats() growth over a row's first call
    warm = max(1, warmup) if compile else warmup  # a compiled row's first call compiles: never a timed one
    for rnd in range(warm + repeats):
        for r in rows:
            before = compile_stats() if r["mode"] == "compiled" and key(r) not in compiled_in_first else None
            t = timer(lambda: step(r))
            if before is not None:
                after = compile_stats()
                compiled_in_first[key(r)] = {k: after[k] - before[k] for k in ("graphs", "seconds")}
            if rnd >= warm:
                times[key(r)].append(t)
        if progress:
            print(f"[visor bench train] round {rnd + 1}/{warm + repeats} ({'warm-up' if rnd < warm else 'timed'})",
                  flush=True)

    base = statistics.median(times[("dense", "eager")])
    out_rows = []
    for r in rows:
        t = statistics.median(times[key(r)])
        pred = r["cm"].train_step(r["keys"], nt, batch=batch, trainable_params=r["trained"], ca_nv=r["ca_nv"])
        out_rows.append(dict(config=r["config"], mode=r["mode"], sa_layers=r["sa"], median_ms=1e3 * t,
                             samples_per_s=batch / t, predicted_ms=pred.ms,
                             compile_s=compiled_in_first[key(r)]["seconds"] if r["mode"] == "compiled" else None,
                             compile_graphs=int(compiled_in_first[key(r)]["graphs"]) if r["mode"] == "compiled" else None,
                             measured_over_predicted=1e3 * t / pred.ms, measured_speedup=base / t,
                             trained_matrix_params=r["trained"], step_tflops=pred.flops / 1e12,
                             predicted_parts_ms={k: 1e3 * v for k, v in pred.parts.items()}))
    for r in out_rows:
        r["predicted_speedup"] = out_rows[0]["predicted_ms"] / r["predicted_ms"]
    return dict(kind="train", device=str(dev), dtype=str(dt).removeprefix("torch."), threads=torch.get_num_threads(),
                profile=prof.describe(), batch=batch, repeats=repeats, text_tokens=nt, visual_tokens=nv,
                schedule=sch.describe(), rows=out_rows)


def markdown(res: dict[str, Any]) -> str:
    head = ("| config | mode | SA layers | step ms | samples/s | compile s | predicted ms | measured / predicted "
            "| speed-up vs dense | predicted speed-up | step TFLOPs (fwd + bwd) | trained matrix params (M) |")
    lines = [f"train step on {res['device']} ({res['dtype']}, {res['threads']} threads), batch {res['batch']}, "
             f"{res['text_tokens']} text + {res['visual_tokens']} visual tokens, median of {res['repeats']} rounds (speed-up: "
             f"against eager dense); "
             f"schedule {res['schedule']}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        comp = f"{r['compile_s']:.1f} ({r['compile_graphs']} graphs)" if r.get("compile_s") is not None else "-"
        lines.append(f"| {r['config']} | {r['mode']} | {r['sa_layers']} | {r['median_ms']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{comp} | {r['predicted_ms']:.0f} | "
                     f"{r['measured_over_predicted']:.2f} | {r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
                     f"{r['step_tflops']:.3f} | {r['trained_matrix_params'] / 1e6:.1f} |")
    lines.append(f"\nprofile: {res['profile']}")
    return "\n".join(lines)


__all__ = ["markdown", "run_train_bench"]
