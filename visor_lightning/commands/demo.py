"""The embedded default (``make demo``): the whole model path on CPU, real images, a tiny random checkpoint.

Steps, as a user with a real LLaVA-OneVision would take them:
1. write a tiny random LLaVA-OneVision with transformers' ``save_pretrained`` (stands in for a downloaded one);
2. ``VisorModel.from_llava_onevision`` on that directory: original keys load, new VISOR weights reported;
3. easy-vqa images through transformers' LLaVA-OV image processor (AnyRes crops), byte-level prompts;
4. for the dense schedule and every feasible VISOR configuration: analytic prefill FLOPs vs the count of torch's
   FlopCounterMode, median measured prefill time, and KV-cache generation checked against cache-free decoding;
5. the policy choosing per sample in a mixed batch; the FLOPs table of the real 0.5B shapes.
Weights are random (training lands with the staged-training issue), so no accuracy is reported.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from visor_lightning.models.visor import left_pad


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompts(questions: list[str], n_vis: list[int], image_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level token ids ``<user> [image] question <assistant>``, left-padded (tiny vocab = 256 bytes)."""
    rows = []
    for q, nv in zip(questions, n_vis):
        before = list(b"user: ")
        after = list(f"\n{q}\nassistant:".encode("ascii", "replace"))
        rows.append(torch.tensor(before + [image_token] * nv + [min(b, image_token - 1) for b in after]))
    return left_pad(rows)


def run_demo(out: str = "runs/model_demo", seed: int = 0, images: int = 8, repeats: int = 7, json_path: str | None = None) -> dict:
    import easy_vqa
    from PIL import Image
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from visor_lightning.flops import FlopsModel, Workload, format_table
    from visor_lightning.models import BackboneSpec, LayerSchedule, ScheduleConfig, VisorModel, tiny_backbone
    from visor_lightning.models.cache import VisorCache

    torch.manual_seed(seed)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out_dir = Path(out)
    ckpt = out_dir / "llava_ov_tiny"
    spec = tiny_backbone()

    print("== 1. a LLaVA-OneVision checkpoint on disk (tiny, random: nothing can be downloaded here)")
    cfg = spec.to_hf_config()
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(ckpt)
    print(f"   wrote {ckpt}")

    print("== 2. VisorModel.from_llava_onevision")
    model, report = VisorModel.from_llava_onevision(ckpt, ScheduleConfig(num_ca=2, num_sa=3, feasible="all"), policy_width=32)
    model.eval()
    print(f"   {report.summary()}")
    sch = model.schedule
    print(f"   schedule {sch.describe()} (S always-on SA, s optional SA, C cross-attention, . text-only); "
          f"feasible: {', '.join(sch.names)}")
    # untrained CA gates are zero (the model is its text path); open them so every configuration differs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in model.new_parameters() and not name.startswith("policy."):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g) if "gate" in name else p + 0.05 * torch.randn(p.shape, generator=g))

    print(f"== 3. {images} easy-vqa images through the LLaVA-OV image processor (AnyRes)")
    paths = easy_vqa.get_test_image_paths()
    qs, _, image_ids = easy_vqa.get_test_questions()
    pick = list(range(images))
    sizes = [(64, 64), (64, 40), (40, 64), (64, 64)]
    pil = [Image.open(paths[image_ids[i]]).convert("RGB").resize(sizes[k % len(sizes)]) for k, i in enumerate(pick)]
    proc = LlavaOnevisionImageProcessorPil(
        size={"height": spec.vision.image_size, "width": spec.vision.image_size},
        image_grid_pinpoints=spec.pinpoints(), do_pad=True,
    )
    enc = proc(pil, return_tensors="pt")
    pixels, image_sizes = enc["pixel_values"], enc["image_sizes"]
    with torch.no_grad():
        n_vis = [v.shape[0] for v in model.encode_images(pixels, image_sizes)]
    ids, mask = _prompts([qs[i] for i in pick], n_vis, model.image_token_id)
    print(f"   pixel_values {tuple(pixels.shape)}; visual tokens per image {n_vis}; sequence length {ids.shape[1]}")

    print("== 4. every configuration: FLOPs (analytic vs FlopCounterMode), prefill time, cached generation")
    dense = VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=None)
    # same host weights and positional conv; dense has no CA blocks and a 1-way policy of its own
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(("lm.ca_blocks", "policy."))}
    missing, unexpected = dense.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith("policy.") for k in missing):
        raise RuntimeError(f"dense baseline did not take the host weights: missing {missing}, unexpected {unexpected}")
    dense.eval()
    fm_dense = FlopsModel(spec, dense.schedule)
    fm = FlopsModel(spec, sch, policy_width=32)
    text_per_row = (ids != model.image_token_id).logical_and(mask.bool()).sum(1).tolist()

    def analytic(f: FlopsModel, active) -> int:
        return sum(f.prefill(active, nt, nv, routed=False) for nt, nv in zip(text_per_row, n_vis))

    def measure(m: VisorModel, cid) -> tuple[int, float, bool, int]:
        c = None if cid is None else torch.full((len(pick),), cid)
        with torch.no_grad():
            emb, is_vis = m.embed(ids, pixels, image_sizes)
            per_row = 0
            for i in range(len(pick)):  # per sample: padding would inflate the measured count
                keep = mask[i].bool()
                with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
                    m.lm(emb[i : i + 1, keep], is_vis[i : i + 1, keep], config_ids=None if c is None else c[i : i + 1], last_only=True)
                per_row += fc.get_total_flops()
            seconds = _median_seconds(lambda: m.lm(emb, is_vis, mask, config_ids=c, last_only=True), repeats)
        cache = VisorCache(m.schedule.num_layers)
        with torch.no_grad():
            m(ids, pixels, image_sizes, mask, config_ids=c, cache=cache, last_only=True)
        a, _ = m.generate(ids, pixels, image_sizes, mask, max_new_tokens=8, config_ids=c, use_cache=True)
        b, _ = m.generate(ids, pixels, image_sizes, mask, max_new_tokens=8, config_ids=c, use_cache=False)
        return per_row, seconds, bool(torch.equal(a, b)), cache.nbytes()

    rows = []
    base = measure(dense, None)
    base_analytic = analytic(fm_dense, None)
    rows.append(dict(config="dense", sa=sch.num_layers, analytic=base_analytic, measured=base[0], seconds=base[1],
                     cache_equal=base[2], kv_bytes=base[3]))
    for cid, active in enumerate(sch.feasible):
        r = measure(model, cid)
        rows.append(dict(config=sch.names[cid], sa=len(active), analytic=analytic(fm, active), measured=r[0],
                         seconds=r[1], cache_equal=r[2], kv_bytes=r[3]))
    print("| config | SA layers | prefill MFLOPs (analytic) | FlopCounterMode | FLOPs saving | prefill ms (median) "
          "| time saving | KV cache KiB | cached generation == uncached |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["flops_saving"] = base_analytic / r["analytic"]
        r["time_saving"] = rows[0]["seconds"] / r["seconds"]
        print(f"| {r['config']} | {r['sa']} | {r['analytic'] / 1e6:.2f} | {r['measured'] / 1e6:.2f} | {r['flops_saving']:.2f}x "
              f"| {r['seconds'] * 1e3:.1f} | {r['time_saving']:.2f}x | {r['kv_bytes'] / 1024:.1f} | {'yes' if r['cache_equal'] else 'NO'} |")

    print("== 5. the policy picks a configuration per sample; the batch runs them mixed")
    with torch.no_grad():
        torch.nn.init.normal_(model.policy.mlp[-1].weight, std=3.0, generator=g)
        routed = model(ids, pixels, image_sizes, mask, use_policy=True, last_only=True)
        forced = model(ids, pixels, image_sizes, mask, config_ids=routed.lm.config_ids, last_only=True)
    chosen = [sch.names[i] for i in routed.lm.config_ids.tolist()]
    same = torch.allclose(routed.logits, forced.logits, atol=1e-5)
    print(f"   chosen (untrained policy): {chosen}; equal to forcing those configurations: {'yes' if same else 'NO'}")

    print("== 6. FLOPs of the real LLaVA-OV 0.5B shapes (visor flops --config experiments/llava_ov_0.5b/model.yaml)")
    print(format_table(FlopsModel(BackboneSpec(), LayerSchedule.build(24)).table(Workload())))
    result = dict(load_report=report.summary(), visual_tokens=n_vis, rows=rows, policy_choice=chosen, policy_mixed_equal=same)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    failures = [r["config"] for r in rows if not r["cache_equal"] or abs(r["measured"] - r["analytic"]) > 0.02 * r["measured"]]
    if failures or not same:
        raise RuntimeError(f"demo checks failed for {failures or ['policy mixed batch']}")
    print("demo OK")
    return result
