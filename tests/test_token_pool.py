"""VISOR-TR: average pooling of the visual grids before the LLM changes the visual-token count and the FLOPs
exactly as the formula says, and the pooled tokens are the window means."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_host, prompt_batch
from test_flops import _within, measured
from visor_lightning.flops import FlopsModel, Workload
from visor_lightning.models import BackboneSpec, ScheduleConfig, VisorModel


@pytest.mark.parametrize("pool, expected", [(1, 16 + 8 * 9), (2, 4 * 2 + 8 * (4 + 1)), (4, 2 * 2 + 4 * (4 + 1))])
def test_pooled_count_by_hand(spec, pool, expected):
    """Tiny spec, a 64x64 image: base crop 4x4 tokens, tiles 2x2 crops = an 8x8 grid, one newline per row.
    pool 2 = 1x2 windows (4x2 base, 8 rows of 4 + newline), pool 4 = 2x2 windows (2x2 base, 4 rows of 4 + newline)."""
    s = dataclasses.replace(spec, token_pool=pool)
    assert s.visual_tokens(64, 64) == expected
    model = VisorModel(s, ScheduleConfig(), host=make_host(s)).eval()
    pixels = torch.randn(1, 5, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_images(pixels, torch.tensor([[64, 64]]))[0].shape[0] == expected


def test_pooled_tokens_are_window_means(spec):
    host = make_host(spec)
    plain = VisorModel(spec, ScheduleConfig(), host=host).eval()
    pooled = VisorModel(spec, ScheduleConfig(), host=host).eval()
    pooled.set_token_pool(4)
    pixels = torch.randn(1, 5, 3, 32, 32)
    sizes = torch.tensor([[64, 64]])
    with torch.no_grad():  # the positional conv is zero at init, so the connector output is the packed grid
        a = plain.encode_images(pixels, sizes)[0]
        b = pooled.encode_images(pixels, sizes)[0]
    base = a[:16].view(4, 4, -1)
    torch.testing.assert_close(b[0], base[:2, :2].reshape(4, -1).mean(0))
    torch.testing.assert_close(b[3], base[2:, 2:].reshape(4, -1).mean(0))
    tiles = a[16:].view(8, 9, -1)  # 8 rows of 8 tokens + newline
    got = b[4:].view(4, 5, -1)  # 4 rows of 4 tokens + newline
    torch.testing.assert_close(got[1, 0], tiles[2:4, 0:2].reshape(4, -1).mean(0))
    torch.testing.assert_close(got[3, 4], tiles[0, 8])  # the newline token itself
    assert pooled.backbone.token_pool == 4 and plain.backbone.token_pool == 1


@pytest.mark.parametrize("pool", [2, 4])
def test_pooled_prefill_flops_match_the_formula_and_the_counter(spec, pool):
    s = dataclasses.replace(spec, token_pool=pool)
    model = VisorModel(s, ScheduleConfig(num_ca=2, num_sa=3, feasible="all"), host=make_host(s)).eval()
    fm, fm_full = FlopsModel(s, model.schedule), FlopsModel(spec, model.schedule)
    pixels = torch.randn(1, 5, 3, 32, 32)
    sizes = torch.tensor([[40, 70]])
    nv = s.visual_tokens(40, 70)
    assert nv < spec.visual_tokens(40, 70)
    ids, _, _ = prompt_batch(model, [nv], before=[6], after=[20])
    with torch.no_grad():
        emb, is_vis = model.embed(ids, pixels, sizes)
    assert int(is_vis.sum()) == nv
    for cid, active in enumerate(model.schedule.feasible):
        real = measured(lambda: model.lm(emb, is_vis, config_ids=torch.tensor([cid]), last_only=True))
        _within(fm.prefill(active, 26, nv, routed=False), real)
        assert fm.prefill(active, 26, nv) < fm_full.prefill(active, 26, spec.visual_tokens(40, 70))
    # the workload the tables quote: LLaVA-OV 0.5B, 2x2 grid (base 27x27, tiles 54x54)
    big = BackboneSpec(token_pool=pool)
    rows, cols = (27, 14) if pool == 2 else (14, 14)
    tiles = (54, 27) if pool == 2 else (27, 27)
    assert Workload().resolve_visual(big) == rows * cols + tiles[0] * (tiles[1] + 1)


def test_bad_pool_is_refused(spec, tmp_path):
    from visor_lightning.config import load_model_section

    with pytest.raises(ValueError, match="backbone.token_pool must be one of"):
        dataclasses.replace(spec, token_pool=3).pool_shape
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  backbone:\n    token_pool: 3\n")
    with pytest.raises(ValueError, match=r"m.yaml: model.backbone.token_pool must be one of"):
        load_model_section(cfg)


def test_tr_table_is_priced_against_unpooled_dense():
    from visor_lightning.models import LayerSchedule

    sch = LayerSchedule.build(24)
    plain = FlopsModel(BackboneSpec(), sch).table(Workload())
    tr = FlopsModel(BackboneSpec(token_pool=2), sch).table(Workload())
    assert tr[0]["visual_tokens"] == plain[0]["visual_tokens"] == 3699
    assert tr[0]["prefill_flops"] == plain[0]["prefill_flops"]
    for a, b in zip(plain[1:], tr[1:]):
        assert b["visual_tokens"] == 27 * 14 + 54 * 28 and b["prefill_saving"] > 1.5 * a["prefill_saving"]
