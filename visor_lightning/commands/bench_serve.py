"""``visor bench serve``: predicted serving numbers per configuration, on a device profile (no model is run).

Where VISOR's visual-KV saving pays: at large decode batches the step reads every sequence's K/V, and the
sequences that fit in memory are bounded by K/V bytes. Per configuration and AnyRes grid:

* TTFT: vision tower + connector + LLM prefill of one request (the vision part is the same for every row), and
  the prefill's kernel time alone (what it would take if launching ops cost nothing: at batch 1 a 0.5B prefill
  is launch-bound on an H100-class GPU);
* decode tokens/s at batch 1, 32 and 128 (the step at the mean context of ``--output-tokens`` generated tokens);
* visual KV per sequence, and all KV (text and generated tokens too);
* how many sequences fit in the memory left after the weights, and the decode throughput at that batch.

It prices a serving engine that writes each new token's K/V in place (paged attention), not ``VisorCache``'s
``torch.cat`` appends, which copy the whole cache every step (``visor bench decode`` measures those), and that
replays decode steps as CUDA graphs (``--eager-decode`` prices a launch per op instead, as eager PyTorch runs).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from visor_lightning.costmodel import CostModel
from visor_lightning.devprofile import DeviceProfile
from visor_lightning.flops import FlopsModel, Workload
from visor_lightning.models.schedule import LayerSchedule, config_name

BATCHES = (1, 32, 128)


def vision_params(spec) -> int:
    """SigLIP up to the feature layer plus the 2-layer projector (norms and biases left out)."""
    v, d = spec.vision, spec.text.hidden_size
    used = v.feature_layer if v.feature_layer >= 0 else v.num_layers + 1 + v.feature_layer
    return (v.num_channels * v.patch_size**2 * v.hidden_size + used * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
            + v.hidden_size * d + d * d)


def serve_rows(section, profile: DeviceProfile, grid: tuple[int, int], *, text_tokens: int = 64, output_tokens: int = 256,
               memory_bytes: float | None = None, bytes_per_element: int = 2, eager_decode: bool = False) -> dict[str, Any]:
    """One row for dense and one per feasible configuration, for a square image tiled ``grid``."""
    spec, sch = section.backbone, section.schedule
    fm = FlopsModel(spec, sch, section.policy_width)
    # a serving engine appends K/V in place (paged attention) and replays decode steps as CUDA graphs; visor's own
    # generate() copies and launches every op (see bench decode)
    engine = dict(cat_appends=False, decode_launches=eager_decode)
    cm = CostModel(fm, profile, bytes_per_element, **engine)
    dense_cm = CostModel(FlopsModel(spec, LayerSchedule.dense(sch.num_layers)), profile, bytes_per_element, **engine)
    work = Workload(text_tokens=text_tokens, grid=grid)
    nt, nv = text_tokens, work.resolve_visual(spec)
    nv_dense = work.resolve_visual(replace(spec, token_pool=1))
    memory = memory_bytes if memory_bytes is not None else profile.memory_bytes
    if memory is None:
        raise ValueError(f"profile {profile.name!r} records no device memory: pass --memory-gb")
    crops = work.crops
    vis_flops = fm.vision(crops) + fm.connector(crops, nv)
    vis_s = vis_flops / profile.gemm_flops(crops * spec.vision.tokens_per_crop, spec.vision.hidden_size, spec.vision.intermediate_size)
    ctx = nt + output_tokens // 2  # attention grows linearly in the context: the mean step is the middle one
    rows = []
    for name, active in [("dense", None)] + [(config_name(c), c) for c in sch.feasible]:
        model, n = (dense_cm, nv_dense) if active is None else (cm, nv)
        keys = fm.visual_keys(active, n)
        ca_nv = None if active is None else n
        prefill = model.prefill(keys, nt, ca_nv=ca_nv, routed=active is not None)
        weights = (model.weight_params(active is not None, tied=spec.text.tie_word_embeddings) + vision_params(spec)) * bytes_per_element
        visual_kv = fm.visual_kv_bytes(active, n, bytes_per_element)
        all_kv = visual_kv + sch.num_layers * (nt + output_tokens) * 2 * fm.d_kv * bytes_per_element
        fit = max(0, int((memory - weights) // all_kv))

        def tok_s(b: int) -> float:
            return b / model.decode_step(keys, ctx, batch=b, ca_nv=ca_nv).seconds

        rows.append(dict(config=name, sa_layers=None if active is None else len(active), visual_tokens=n,
                         ttft_ms=1e3 * (vis_s + prefill.seconds), prefill_ms=prefill.ms,
                         prefill_kernels_ms=1e3 * sum(v for k, v in prefill.parts.items() if k != "overhead"),
                         decode_tokens_per_s={str(b): tok_s(b) for b in BATCHES},
                         visual_kv_bytes=visual_kv, kv_bytes_per_sequence=all_kv, weight_bytes=weights,
                         max_batch=fit, throughput_at_max_batch=tok_s(fit) if fit else 0.0))
    return dict(grid=f"{grid[0]}x{grid[1]}", text_tokens=nt, visual_tokens=nv, output_tokens=output_tokens, eager_decode=eager_decode,
                memory_bytes=memory, bytes_per_element=bytes_per_element, vision_ms=1e3 * vis_s, rows=rows)


def markdown(res: dict[str, Any]) -> str:
    gb = res["memory_bytes"] / 1e9
    head = ("| config | TTFT ms | prefill ms | prefill kernels ms | tok/s @1 | tok/s @32 | tok/s @128 | visual KV MiB/seq | KV MiB/seq "
            f"| sequences in {gb:.0f} GB | tok/s at that batch |")
    lines = [f"{res['grid']} grid: {res['text_tokens']} text + {res['visual_tokens']} visual tokens, "
             f"{res['output_tokens']} generated; vision tower + connector {res['vision_ms']:.1f} ms of each TTFT; "
             "K/V appended in place; decode steps " + ("launched op by op" if res["eager_decode"] else "replayed as CUDA graphs")
             + "; prefill launched op by op", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        t = r["decode_tokens_per_s"]
        lines.append(f"| {r['config']} | {r['ttft_ms']:.1f} | {r['prefill_ms']:.1f} | {r['prefill_kernels_ms']:.2f} | {t['1']:.0f} | {t['32']:.0f} | {t['128']:.0f} "
                     f"| {r['visual_kv_bytes'] / 2**20:.1f} | {r['kv_bytes_per_sequence'] / 2**20:.1f} | {r['max_batch']} "
                     f"| {r['throughput_at_max_batch']:.0f} |")
    return "\n".join(lines)


__all__ = ["markdown", "serve_rows", "vision_params"]
