"""The analytic FLOPs model against torch's own FlopCounterMode on the executed graph."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import image_batch, make_host, prompt_batch, wake_new_weights
from visor_lightning.flops import FlopsModel, Workload, format_table
from visor_lightning.models import BackboneSpec, LayerSchedule, ScheduleConfig, VisorModel


def measured(fn) -> int:
    # the math SDPA backend decomposes attention into bmm, which FlopCounterMode counts
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return counter.get_total_flops()


def _within(analytic: float, real: float, tol: float = 0.02) -> None:
    assert real > 0
    assert abs(analytic - real) / real <= tol, f"analytic {analytic} vs measured {real}"


@pytest.mark.parametrize("schedule", ["dense", "ca_only", "visor_all"])
def test_prefill_flops_match_flop_counter(spec, schedule):
    if schedule == "dense":
        sch = LayerSchedule.dense(spec.text.num_layers)
    elif schedule == "ca_only":
        sch = LayerSchedule.build(spec.text.num_layers, ScheduleConfig(num_sa=0))
    else:
        sch = LayerSchedule.build(spec.text.num_layers, ScheduleConfig(num_ca=2, num_sa=3, feasible="all"))
    model = wake_new_weights(VisorModel(spec, sch, host=make_host(spec)).eval())
    fm = FlopsModel(spec, sch, policy_width=256)
    pixels, image_sizes, n_vis = image_batch(model, [(40, 70)])
    ids, _, _ = prompt_batch(model, n_vis, before=[6], after=[20])
    nt, nv = ids.shape[1] - n_vis[0], n_vis[0]
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, image_sizes)
    for cid, active in enumerate(sch.feasible):
        real = measured(lambda: model.lm(emb, is_vis, config_ids=torch.tensor([cid]), last_only=True))
        analytic = fm.prefill(None if schedule == "dense" else active, nt, nv, routed=False)
        _within(analytic, real)
    # with the policy deciding, its MLP is part of the count
    if sch.router_layer is not None:
        real = measured(lambda: model(ids, pixels, image_sizes, use_policy=True, last_only=True))
        chosen = model(ids, pixels, image_sizes, use_policy=True, last_only=True).lm.config_ids
        crops = model.connector.num_crops((40, 70))
        analytic = fm.prefill(sch.feasible[int(chosen)], nt, nv) + fm.vision(crops) + fm.connector(crops, nv)
        _within(analytic, real)
        # the policy's own term (~0.3% of the total, inside the 2%): exactly the routed count minus the count of the
        # same configuration forced
        forced = measured(lambda: model(ids, pixels, image_sizes, config_ids=chosen, last_only=True))
        active = sch.feasible[int(chosen)]
        policy_term = fm.prefill(active, nt, nv, routed=True) - fm.prefill(active, nt, nv, routed=False)
        assert policy_term > 0 and real - forced == policy_term


def test_vision_and_connector_flops_match(spec):
    model = VisorModel(spec, ScheduleConfig(), host=make_host(spec)).eval()
    fm = FlopsModel(spec, model.schedule)
    pixels, image_sizes, n_vis = image_batch(model, [(64, 64)])
    crops = model.connector.num_crops((64, 64))
    real = measured(lambda: model.encode_images(pixels, image_sizes))
    _within(fm.vision(crops) + fm.connector(crops, n_vis[0]), real)


def test_decode_flops_match(visor_model, spec):
    from visor_lightning.models.cache import VisorCache

    fm = FlopsModel(spec, visor_model.schedule)
    pixels, image_sizes, n_vis = image_batch(visor_model, [(32, 32)])
    ids, _, _ = prompt_batch(visor_model, n_vis, before=[4], after=[10])
    nt, nv = ids.shape[1] - n_vis[0], n_vis[0]
    for cid, active in enumerate(visor_model.schedule.feasible):
        cache = VisorCache(visor_model.schedule.num_layers)
        with torch.no_grad():
            visor_model(ids, pixels, image_sizes, config_ids=torch.tensor([cid]), cache=cache, last_only=True)
        total = 0
        for _ in range(3):
            total += measured(lambda: visor_model.lm.decode_step(torch.tensor([7]), cache))
        _within(fm.decode(active, nt, nv, 3), total / 3)


def test_llava_ov_05b_table_is_consistent():
    """0.5B shapes: dense saving 1.0, savings fall monotonically with SA layers, visual KV tracks layer count."""
    spec = BackboneSpec()
    sch = LayerSchedule.build(24)
    assert sch.describe() == "SC." + "sC." * 7 and len(sch.ca_layers) == 8 and len(sch.sa_layers) == 8
    rows = FlopsModel(spec, sch).table(Workload())
    assert rows[0]["config"] == "dense" and rows[0]["prefill_saving"] == 1.0
    assert rows[0]["visual_tokens"] == 729 + 54 * 55  # 2x2 AnyRes grid: base + tiles + row newlines
    savings = [r["prefill_saving"] for r in rows[1:]]
    assert savings == sorted(savings, reverse=True) and savings[-1] > 1
    kv = [r["visual_kv_bytes"] for r in rows]
    assert kv[0] == 3699 * 24 * 2 * 128 * 2 and kv[1] == 3699 * (1 + 8) * 2 * 128 * 2
    assert "| dense |" in format_table(rows)
