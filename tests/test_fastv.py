"""FastV-style pruning (the token-reduction peer): R = 0 is the dense model, R > 0 keeps exactly the visual
tokens layer K-1's last token attends to most (checked against transformers' eager attention weights), the pruned
KV cache decodes over the prefill's selection, and the FLOPs formula matches FlopCounterMode."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import image_batch, make_host, prompt_batch
from test_flops import _within, measured
from visor_lightning.flops import FlopsModel
from visor_lightning.models import LayerSchedule, ScheduleConfig, VisorModel
from visor_lightning.models.cache import VisorCache
from visor_lightning.models.fastv import FastVConfig, fastv_keep, fastv_prefill

SIZES = [(32, 32), (40, 70), (64, 40)]


def _dense(spec):
    host = make_host(spec)
    return host, VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=host).eval()


def _batch(model):
    pixels, image_sizes, n_vis = image_batch(model, SIZES)
    ids, mask, rows = prompt_batch(model, n_vis, before=[3, 5, 2], after=[7, 4, 9])
    return pixels, image_sizes, ids, mask, rows, n_vis


@pytest.mark.parametrize("k", [1, 3])
def test_ratio_zero_equals_dense(spec, k):
    _, model = _dense(spec)
    pixels, image_sizes, ids, mask, _, n_vis = _batch(model)
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, image_sizes)
        dense = model.lm(emb, is_vis, mask, last_only=True).logits
        pruned, kept = fastv_prefill(model.lm, emb, is_vis, mask, FastVConfig(k, 0.0))
    torch.testing.assert_close(pruned, dense, atol=1e-5, rtol=1e-5)
    assert kept.tolist() == n_vis
    a, _ = model.generate(ids, pixels, image_sizes, mask, max_new_tokens=6)
    b, _ = model.generate(ids, pixels, image_sizes, mask, max_new_tokens=6, fastv=FastVConfig(k, 0.0))
    assert torch.equal(a, b)


def _eager(host):
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = copy.deepcopy(host.config)  # VISOR's layers share host.config and need SDPA
    cfg.text_config._attn_implementation = "eager"  # eager returns the attention weights
    eager = LlavaOnevisionForConditionalGeneration(cfg).eval()
    eager.load_state_dict(host.state_dict())
    return eager


def _reference_keep(eager, e, v, k, r):
    """The tokens FastV keeps, from transformers' own attention weights of layer k-1 (last token, head mean)."""
    att = eager.model.language_model(inputs_embeds=e, output_attentions=True).attentions[k - 1]
    received = att[0].mean(0)[-1]
    vis_pos = v[0].nonzero().flatten()
    keep = ~v[0]
    keep[vis_pos[received[vis_pos].topk(fastv_keep(len(vis_pos), r)).indices]] = True
    return keep


def _run_pruned(lm, x, keep, k):
    """Layers by hand: the whole sequence before layer k, the kept tokens (original positions) from k on."""
    pos = torch.arange(x.shape[1])[None]
    for l, layer in enumerate(lm.layers):
        if l == k:
            x, pos = x[:, keep], pos[:, keep]
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        x = layer(x, attention_mask=causal, position_embeddings=lm.rotary_emb(x, pos))
    return lm.lm_head(lm.norm(x[:, -1]))


def test_pruning_keeps_the_most_attended_tokens(spec):
    host, model = _dense(spec)
    eager = _eager(host)
    k, r = 2, 0.6
    pixels, image_sizes, ids, mask, rows, n_vis = _batch(model)
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, image_sizes)
        got, kept = fastv_prefill(model.lm, emb, is_vis, mask, FastVConfig(k, r))
        for i, row in enumerate(rows):
            e, v = model.embed(row[None], pixels[i : i + 1], image_sizes[i : i + 1])
            assert int(kept[i]) == fastv_keep(n_vis[i], r) and 0 < int(kept[i]) < n_vis[i]
            ref = _run_pruned(model.lm, e, _reference_keep(eager, e, v, k, r), k)
            torch.testing.assert_close(got[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_pruned_cache_decodes_with_the_prefill_selection(spec):
    """As FastV with a KV cache: the prompt's prefill picks the tokens, generated tokens see only those."""
    host, model = _dense(spec)
    eager = _eager(host)
    k, r = 2, 0.5
    pixels, image_sizes, ids, mask, rows, n_vis = _batch(model)
    cache = VisorCache(spec.text.num_layers)
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, image_sizes)
        first, _ = fastv_prefill(model.lm, emb, is_vis, mask, FastVConfig(k, r), cache)
        nxt = first.argmax(-1)
        nt = (mask.bool() & ~is_vis).sum(1)
        counts = cache.keys_per_layer()
        assert counts[k - 1].tolist() == (nt + torch.tensor(n_vis)).tolist()  # before K: every token
        assert counts[k].tolist() == [int(t) + fastv_keep(v, r) for t, v in zip(nt, n_vis)]  # from K on: pruned
        second = model.lm.decode_step(nxt, cache)
        for i, row in enumerate(rows):
            e, v = model.embed(row[None], pixels[i : i + 1], image_sizes[i : i + 1])
            keep = torch.cat([_reference_keep(eager, e, v, k, r), torch.tensor([True])])
            x = torch.cat([e, model.lm.embed_tokens(nxt[i : i + 1])[:, None]], dim=1)
            torch.testing.assert_close(second[i : i + 1], _run_pruned(model.lm, x, keep, k), atol=1e-5, rtol=1e-5)
    tokens, _ = model.generate(ids, pixels, image_sizes, mask, max_new_tokens=2, fastv=FastVConfig(k, r))
    assert torch.equal(tokens[:, 0], nxt) and torch.equal(tokens[:, 1], second.argmax(-1))


def test_fastv_flops_match_flop_counter(spec):
    _, model = _dense(spec)
    fm = FlopsModel(spec, model.schedule)
    pixels, image_sizes, n_vis = image_batch(model, [(40, 70)])
    ids, mask, _ = prompt_batch(model, n_vis, before=[6], after=[20])
    nt, nv = ids.shape[1] - n_vis[0], n_vis[0]
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, image_sizes)
    for k, r in [(1, 0.0), (2, 0.5), (3, 0.9), (1, 1.0)]:
        real = measured(lambda: fastv_prefill(model.lm, emb, is_vis, mask, FastVConfig(k, r)))
        _within(fm.fastv_prefill(nt, nv, k, r), real, tol=0.03)  # + the one-query score row FastV leaves out
    assert fm.fastv_prefill(nt, nv, 2, 0.0) == fm.prefill(None, nt, nv)


def test_matched_ratio_and_bad_arguments(spec):
    sch = LayerSchedule.build(spec.text.num_layers, ScheduleConfig())
    visor, dense = FlopsModel(spec, sch), FlopsModel(spec, LayerSchedule.dense(spec.text.num_layers))
    target = visor.prefill(sch.feasible[0], 20, 80, routed=False)
    r = dense.fastv_ratio_for(target, [(20, 80)], 1)
    step = dense.fastv_prefill(20, 80, 1, 0.0) - dense.fastv_prefill(20, 80, 1, 1 / 80)
    assert abs(dense.fastv_prefill(20, 80, 1, r) - target) <= step
    assert FastVConfig.parse(FastVConfig(2, 0.25).name) == FastVConfig(2, 0.25) and FastVConfig.parse("sa[0]") is None
    with pytest.raises(ValueError, match="K must be >= 1"):
        FastVConfig(0, 0.5)
    with pytest.raises(ValueError, match="ratio R"):
        FastVConfig(2, 1.5)
    visor_model = VisorModel(spec, ScheduleConfig(), host=make_host(spec)).eval()
    pixels, image_sizes, ids, mask, _, _ = _batch(visor_model)
    with pytest.raises(ValueError, match="dense host model"):
        visor_model.generate(ids, pixels, image_sizes, mask, fastv=FastVConfig(2, 0.5))
