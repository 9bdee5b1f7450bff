"""Per-sample configurations, KV-cache generation, and the policy in the loop."""

from __future__ import annotations

import pytest
import torch

from conftest import image_batch, prompt_batch
from visor_lightning.models import LayerSchedule, ScheduleConfig, VisorModel
from visor_lightning.models.cache import VisorCache

SIZES = [(32, 32), (40, 70), (64, 40), (32, 64)]


def _batch(model, before=(3, 5, 2, 4), after=(7, 4, 9, 6)):
    pixels, image_sizes, n_vis = image_batch(model, SIZES)
    ids, mask, rows = prompt_batch(model, n_vis, list(before), list(after))
    return pixels, image_sizes, ids, mask, rows


def test_configurations_change_the_output(visor_model):
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    outs = []
    with torch.no_grad():
        for cid in range(len(visor_model.schedule.feasible)):
            c = torch.full((4,), cid)
            outs.append(visor_model(ids, pixels, image_sizes, mask, config_ids=c).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the optional SA layer really refines V


def test_mixed_batch_equals_per_sample_runs(spec):
    from conftest import make_host, wake_new_weights

    model = wake_new_weights(VisorModel(spec, ScheduleConfig(num_ca=2, num_sa=3, feasible="all"), host=make_host(spec)).eval())
    assert len(model.schedule.feasible) == 4
    pixels, image_sizes, ids, mask, rows = _batch(model)
    config_ids = torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        mixed = model(ids, pixels, image_sizes, mask, config_ids=config_ids)
        for i, row in enumerate(rows):
            alone = model(row[None], pixels[i : i + 1], image_sizes[i : i + 1], config_ids=config_ids[i : i + 1])
            valid = mixed.lm.streams.text_valid[i]
            torch.testing.assert_close(mixed.logits[i][valid], alone.logits[0], atol=1e-5, rtol=1e-5)
    calls = mixed.lm.layer_calls
    # every optional SA layer ran as SA for some rows and text-only for the others
    for l in model.schedule.optional_sa:
        assert calls.get(f"{l}:sa") == 1 and calls.get(f"{l}:text") == 1


def test_reused_image_features_give_the_same_answers_with_one_vision_pass(visor_model):
    """Evaluation scores several targets on one batch inside reuse_image_features: the vision tower runs once per
    image batch there, and every configuration's answers equal those of a fresh encoding."""
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    configs = [torch.full((4,), c) for c in range(len(visor_model.schedule.feasible))]
    fresh = [visor_model.generate(ids, pixels, image_sizes, mask, max_new_tokens=3, config_ids=c)[0] for c in configs]
    calls = []
    hook = visor_model.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        with visor_model.reuse_image_features():
            reused = [visor_model.generate(ids, pixels, image_sizes, mask, max_new_tokens=3, config_ids=c)[0]
                      for c in configs]
            visor_model.generate(ids, pixels.clone(), image_sizes, mask, max_new_tokens=3)  # other tensors: encoded
        visor_model.generate(ids, pixels, image_sizes, mask, max_new_tokens=3)  # outside: encoded again
    finally:
        hook.remove()
    assert len(configs) > 1 and len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))


@pytest.mark.parametrize("schedule", ["dense", "ca_only", "default_min", "default_max", "mixed"])
def test_generation_with_cache_equals_without(spec, schedule):
    from conftest import make_host, wake_new_weights

    host = make_host(spec)
    if schedule == "dense":
        model = VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=host).eval()
        ids_cfg = None
    elif schedule == "ca_only":
        model = wake_new_weights(VisorModel(spec, ScheduleConfig(num_sa=0), host=host).eval())
        ids_cfg = None
    else:
        model = wake_new_weights(VisorModel(spec, ScheduleConfig(num_ca=2, num_sa=3, feasible="all"), host=host).eval())
        ids_cfg = {"default_min": [0, 0, 0, 0], "default_max": [3, 3, 3, 3], "mixed": [3, 0, 2, 1]}[schedule]
    pixels, image_sizes, ids, mask, _ = _batch(model)
    cfg = torch.tensor(ids_cfg) if ids_cfg is not None else None
    with_cache, c1 = model.generate(ids, pixels, image_sizes, mask, max_new_tokens=6, config_ids=cfg, use_cache=True)
    without, c2 = model.generate(ids, pixels, image_sizes, mask, max_new_tokens=6, config_ids=cfg, use_cache=False)
    assert with_cache.shape == (4, 6)
    assert torch.equal(with_cache, without)
    assert torch.equal(c1, c2)


def test_decode_step_logits_match_full_recompute(visor_model):
    """Stronger than equal argmax: every decode step's logits equal a fresh prefill over the grown sequence."""
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    cfg = torch.tensor([1, 0, 1, 0])
    cache = VisorCache(visor_model.schedule.num_layers)
    with torch.no_grad():
        logits = visor_model(ids, pixels, image_sizes, mask, config_ids=cfg, cache=cache, last_only=True).logits
        for _ in range(4):
            nxt = logits.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = visor_model.lm.decode_step(nxt, cache)
            ref = visor_model(ids, pixels, image_sizes, mask, config_ids=cfg, last_only=True).logits
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_cache_holds_visual_kv_only_where_needed(visor_model):
    sch = visor_model.schedule  # SA 0 (always), 3 (optional); CA 1, 4
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    cfg = torch.zeros(4, dtype=torch.long)  # minimal configuration: only layer 0 runs SA
    cache = VisorCache(sch.num_layers)
    with torch.no_grad():
        out = visor_model(ids, pixels, image_sizes, mask, config_ids=cfg, cache=cache, last_only=True)
    n_text = out.lm.streams.text_valid.sum(1)
    n_vis = out.lm.streams.vis_valid.sum(1)
    keys = cache.keys_per_layer()
    for l in range(sch.num_layers):
        expected = n_text + n_vis if l in sch.feasible[0] else n_text
        assert torch.equal(keys[l], expected), f"layer {l} ({sch.role(l)})"
    assert set(cache.ca_kv) == set(sch.ca_layers)
    for k, v in cache.ca_kv.values():
        assert k.shape[2] == int(n_vis.max())  # CA K/V: computed once per image, visual tokens only


def test_policy_picks_per_sample_and_batch_runs_mixed(visor_model):
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    with torch.no_grad():
        torch.nn.init.normal_(visor_model.policy.mlp[-1].weight, std=5.0)
        out = visor_model(ids, pixels, image_sizes, mask, use_policy=True)
    logits = out.lm.policy_logits
    assert logits.shape == (4, len(visor_model.schedule.feasible))
    assert torch.equal(out.lm.config_ids, logits.argmax(-1))
    with torch.no_grad():
        forced = visor_model(ids, pixels, image_sizes, mask, config_ids=out.lm.config_ids)
    torch.testing.assert_close(out.logits, forced.logits, atol=1e-6, rtol=1e-6)
    tokens, chosen = visor_model.generate(ids, pixels, image_sizes, mask, max_new_tokens=3, use_policy=True)
    assert torch.equal(chosen, out.lm.config_ids)


def test_gradients_reach_new_weights(visor_model):
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    labels = ids.masked_fill(ids == visor_model.image_token_id, -100).masked_fill(mask == 0, -100)
    out = visor_model.train()(ids, pixels, image_sizes, mask, labels=labels, config_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in visor_model.named_parameters():
        if name.startswith(("lm.ca_blocks.", "connector.cpe.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_before_the_image_does_not_see_it(visor_model):
    """Causal like the host: CA and SA layers let a text token read only visual tokens that precede it."""
    pixels, image_sizes, ids, mask, _ = _batch(visor_model)
    other = torch.randn_like(pixels)
    cfg = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        a = visor_model(ids, pixels, image_sizes, mask, config_ids=cfg)
        b = visor_model(ids, other, image_sizes, mask, config_ids=cfg)
    st = a.lm.streams
    first_visual = st.vis_idx[:, :1]
    before = st.text_valid & (st.text_idx < first_visual)
    after = st.text_valid & (st.text_idx > first_visual)
    assert before.sum() >= 4 and after.sum() >= 4
    torch.testing.assert_close(a.logits[before], b.logits[before], atol=1e-6, rtol=1e-6)
    assert (a.logits[after] - b.logits[after]).abs().amax(-1).min() > 1e-4


def test_text_only_batch_is_the_host_lm_and_caches(spec):
    """No image at all: CA blocks (woken up) see no visual token and add nothing, so the logits are the host LLM's
    on the same ids, whatever the policy picks; cached generation still matches."""
    from conftest import make_host, wake_new_weights

    host = make_host(spec)
    visor_model = wake_new_weights(VisorModel(spec, ScheduleConfig(), host=host).eval())
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = visor_model(ids, use_policy=True)
        want = host(input_ids=ids).logits
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    a, _ = visor_model.generate(ids, max_new_tokens=4)
    b, _ = visor_model.generate(ids, max_new_tokens=4, use_cache=False)
    assert torch.equal(a, b)


def test_initializer_range_sets_the_from_scratch_init_and_survives_export():
    import dataclasses

    from visor_lightning.models.spec import BackboneSpec, tiny_backbone

    def lm_std(spec) -> float:
        torch.manual_seed(0)
        lm = VisorModel(spec).lm
        host = [p.flatten() for n, p in lm.named_parameters() if n.endswith("proj.weight") and "ca_" not in n]
        return torch.cat(host).std().item()

    default = tiny_backbone()
    wide = dataclasses.replace(default, text=dataclasses.replace(default.text, initializer_range=0.1))
    assert lm_std(default) == pytest.approx(0.02, rel=0.05)  # Qwen2's own init, unchanged by default
    assert lm_std(wide) == pytest.approx(0.1, rel=0.05)
    # the exported base's config.json carries it, so the spec read back from a checkpoint is the one trained
    assert BackboneSpec.from_hf_config(wide.to_hf_config()).text.initializer_range == 0.1
