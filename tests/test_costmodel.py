"""The cost model, the device profile and the filled decode cache: arithmetic and structure only, never timings.

* the FLOPs model's op lists sum to its totals and to hand-counted products on the tiny config;
* the cost model by hand: one known profile, one op, one decode step;
* bytes the model prices vs the real parameters and the real cache;
* the profile file format (round trip, clear errors) and a real (small) measurement;
* the filled cache vs a real prefill's cache; the launch counts vs torch.profiler;
* ``visor bench serve`` and ``visor bench train`` tables against the cost model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from visor_lightning.cli import main
from visor_lightning.commands.bench_model import build_lms, make_inputs
from visor_lightning.config import load_model_section
from visor_lightning.costmodel import (ACT_D, ACT_M, BACKWARD, LAUNCHES_CA, LAUNCHES_DECODE_FIXED, LAUNCHES_DECODE_LAYER,
                                       LAUNCHES_PREFILL_FIXED, LAUNCHES_PREFILL_LAYER, LAUNCHES_STREAMS, CostModel)
from visor_lightning.devprofile import DeviceProfile, datasheet_profile, interpolate, measure, nondecreasing
from visor_lightning.flops import FlopsModel, total_flops
from visor_lightning.models import LayerSchedule
from visor_lightning.models.cache import VisorCache
from visor_lightning.models.fastv import FastVConfig, fastv_keep, fastv_prefill

TINY = "experiments/debug/tiny.yaml"


def flat_profile(flops: float = 1e9, bandwidth: float = 1e9, overhead: float = 1e-6) -> DeviceProfile:
    t = [[1, flops], [1e9, flops]]
    return DeviceProfile(name="hand", device="cpu", dtype="float32", threads=1, assumed=True, bandwidth=bandwidth,
                         elementwise=bandwidth / 4, op_overhead_s=overhead, adamw_s_per_param=5e-9, gemm={"64x64": t}, sdpa=t, sdpa_decode=t)


@pytest.fixture(scope="module")
def tiny():
    sec = load_model_section(TINY)
    return sec, FlopsModel(sec.backbone, sec.schedule, sec.policy_width)


def test_op_lists_sum_to_the_flops_totals_and_to_hand_counts(tiny):
    sec, fm = tiny
    d, m, kv, V, L = 64, 128, 32, 256, 6  # tiny.yaml: hidden 64, MLP 128, 2 kv heads x 16, vocab 256, 6 layers
    nt, nv = 10, 20
    layer = lambda n: 2 * n * (2 * d * d + 2 * d * kv) + 4 * n * n * d + 6 * n * d * m  # noqa: E731
    ca = 2 * (2 * nt * d * d + 2 * nv * d * kv) + 4 * nt * nv * d
    assert fm.prefill(None, nt, nv) == L * layer(nt + nv) + 2 * d * V
    # sa[0] on SC.sC.: layer 0 over nt + nv, the other five text-only, two CA blocks
    assert fm.prefill((0,), nt, nv, routed=False) == layer(nt + nv) + 5 * layer(nt) + 2 * ca + 2 * d * V
    assert fm.prefill((0,), nt, nv) - fm.prefill((0,), nt, nv, routed=False) == 2 * (2 * d * 32 + 32 * 2)
    ops = fm.prefill_ops(fm.visual_keys((0, 3), nv), nt, batch=3, ca_nv=nv)
    assert total_flops(ops) == 3 * fm.prefill((0, 3), nt, nv, routed=False)
    assert {o.name for o in ops if o.block == "ca"} >= {"1.ca.q", "1.ca.k", "1.ca.attn", "4.ca.o"}
    # decode step t: per layer projections + MLP over one token, attention over the context (+ visual keys)
    step = lambda ctx, keys: sum(2 * (2 * d * d + 2 * d * kv) + 4 * (ctx + v) * d + 6 * d * m for v in keys) + 2 * d * V  # noqa: E731
    keys = fm.visual_keys((0,), nv)
    ca_dec = 2 * (4 * d * d + 4 * nv * d)
    assert total_flops(fm.decode_ops(keys, nt + 1, ca_nv=nv)) == step(nt + 1, keys) + ca_dec
    assert fm.decode((0,), nt, nv, 2) == (step(nt + 1, keys) + step(nt + 2, keys)) / 2 + ca_dec
    assert fm.fastv_prefill(nt, nv, 2, 0.5) == 2 * layer(nt + nv) + 4 * layer(nt + fastv_keep(nv, 0.5)) + 2 * d * V


def test_cost_model_by_hand_on_a_known_profile(tiny):
    sec, fm = tiny
    bw, thr, ov = 2e9, 1e9, 1e-6
    cm = CostModel(fm, flat_profile(thr, bw, ov), bytes_per_element=4)
    d, m, kv, V, L = 64, 128, 32, 256, 6
    gemm = fm.prefill_ops([0] * L, 8)[0]  # layer 0's q projection over 8 rows
    assert (gemm.rows, gemm.k, gemm.n) == (8, d, d)
    assert cm.op_seconds(gemm) == (max(2 * 8 * d * d / thr, 4 * (d * d + 8 * d + 8 * d) / bw), 4 * (d * d + 16 * d))
    # a dense decode step at batch 2, context c, no visual keys: every op priced by hand
    c, b = 5, 2
    step = cm.decode_step([0] * L, c, batch=b)
    gemms = [(d, d), (d, kv), (d, kv), (d, d), (d, m), (d, m), (m, d)]
    t_gemm = L * sum(max(2 * b * k * n / thr, 4 * (k * n + b * k + b * n) / bw) for k, n in gemms)
    attn_flops, attn_bytes = b * 4 * c * d, 4 * (2 * b * d + b * c * 2 * kv + b * c / 4)
    t_attn = L * max(attn_flops / thr, attn_bytes / bw)
    t_head = max(2 * b * d * V / thr, 4 * (d * V + b * d + b * V) / bw)
    t_mem = 4 * b * L * (ACT_D * d + ACT_M * m) / (bw / 4) + 4 * b * 2 * L * (c - 1) * 2 * kv / bw
    t_over = (L * LAUNCHES_DECODE_LAYER + LAUNCHES_DECODE_FIXED) * ov
    assert step.seconds == pytest.approx(t_gemm + t_attn + t_head + t_mem + t_over, rel=1e-12)
    assert step.parts["overhead"] == pytest.approx(t_over) and step.flops == total_flops(fm.decode_ops([0] * L, c, batch=b))
    # the mean over steps is the mean of the steps; a training step is 1 + 2 passes plus AdamW's traffic
    mean = cm.decode([0] * L, 4, 3, batch=b)
    assert mean.seconds == pytest.approx(sum(cm.decode_step([0] * L, 4 + t, batch=b).seconds for t in (1, 2, 3)) / 3)
    fwd = cm.prefill([0] * L, 8, batch=1, head_rows=8)
    train = cm.train_step([0] * L, 8, batch=1, trainable_params=1000)
    backward = sum(BACKWARD[part] * s for part, s in fwd.parts.items())
    assert train.seconds == pytest.approx(fwd.seconds + backward + 1000 * 5e-9)
    assert train.flops == 3 * fwd.flops and train.parts["optimizer"] == pytest.approx(5e-6)
    # on a GPU the launches overlap the kernels: the longer of the two, not the sum
    gpu = CostModel(fm, datasheet_profile("h100-sxm"), 2).decode_step([0] * L, c, batch=b)
    assert gpu.seconds == pytest.approx(max(gpu.parts["overhead"], sum(v for k, v in gpu.parts.items() if k != "overhead")))


def test_weight_bytes_match_the_real_parameters_and_each_pass_reads_each_weight_once(tiny):
    sec, fm = tiny
    visor, dense = build_lms(sec, torch.device("cpu"), torch.float32)
    cm = CostModel(fm, flat_profile(), 4)
    mats = lambda mod: sum(p.numel() for p in mod.parameters() if p.dim() == 2)  # noqa: E731
    assert cm.weight_params(with_ca=True) == mats(visor)
    assert cm.weight_params(with_ca=False) == mats(dense)
    assert cm.weight_params(with_ca=True, embedding=False) == mats(visor) - visor.embed_tokens.weight.numel()
    # the GEMMs of a prefill read every matrix but the embedding exactly once; a decode step all but the CA
    # blocks' k/v projections too (the visual K/V are cached)
    ca_kv = sum(p.numel() for n, p in visor.ca_blocks.named_parameters() if n.split(".")[-2] in ("k_proj", "v_proj"))
    for ops, skipped in ((fm.prefill_ops(fm.visual_keys((0,), 7), 5, ca_nv=7), 0),
                         (fm.decode_ops(fm.visual_keys((0,), 7), 6, ca_nv=7), ca_kv)):
        weights = sum(o.k * o.n for o in ops if o.kind == "gemm" and o.block != "policy")
        assert weights == cm.weight_params(with_ca=True, embedding=False) - skipped


def test_filled_cache_has_the_layout_of_a_real_prefill(tiny):
    sec, fm = tiny
    visor, dense = build_lms(sec, torch.device("cpu"), torch.float32)
    nt, nv, b = 12, 20, 3
    emb, is_vis, mask = make_inputs(64, nt, nv, b, torch.device("cpu"), torch.float32)
    t = sec.backbone.text
    cases = [(visor, dict(config_ids=torch.full((b,), cid)), fm.visual_keys(a, nv), True, cid)
             for cid, a in enumerate(sec.schedule.feasible)]
    cases.append((dense, {}, fm.visual_keys(None, nv), False, dense.schedule.full_config))
    with torch.inference_mode():
        for lm, kw, keys, ca_nv, cid in cases:
            real = VisorCache(6)
            lm(emb, is_vis, mask, cache=real, last_only=True, **kw)
            fake = VisorCache.filled(keys, nt, b, kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                                     ca_layers=tuple(int(l) for l in lm.ca_blocks), visual=nv, config_id=cid)
            assert [k.shape for k in fake.k] == [k.shape for k in real.k]
            assert [k.shape for k in fake.v] == [k.shape for k in real.v]
            assert all(torch.equal(f, r) for f, r in zip(fake.valid, real.valid))
            assert sorted(fake.ca_kv) == sorted(real.ca_kv)
            assert all(fake.ca_kv[l][0].shape == real.ca_kv[l][0].shape for l in real.ca_kv)
            assert torch.equal(fake.next_pos, real.next_pos) and torch.equal(fake.config_ids, real.config_ids)
            assert torch.equal(fake.visual_valid, real.visual_valid)
            active = sec.schedule.feasible[cid] if ca_nv else None
            assert fake.nbytes() == real.nbytes() == b * (6 * nt * 2 * fm.d_kv * 4 + fm.visual_kv_bytes(active, nv, 4))
            nxt = torch.zeros(b, dtype=torch.long)
            assert lm.decode_step(nxt, fake).shape == lm.decode_step(nxt, real).shape == (b, t.vocab_size)
        # FastV: the pruned layers hold nt + kept keys
        real = VisorCache(6)
        fastv_prefill(dense, emb, is_vis, mask, FastVConfig(2, 0.5), real)
        keys = fm.fastv_keys(nv, 2, 0.5)
        fake = VisorCache.filled(keys, nt, b, kv_heads=t.num_kv_heads, head_dim=t.head_dim, visual=nv)
        assert [k.shape for k in fake.k] == [k.shape for k in real.k]
        assert torch.equal(fake.next_pos, real.next_pos)


def test_launch_counts_match_the_profiler_at_three_layer_counts(tiny):
    """The framework-op counts the overhead term uses, counted with torch.profiler on dense models of 3, 6 and 9
    layers (per-layer slope and intercept: exact) and on the tiny VISOR model (its stream bookkeeping: within 10%)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import Qwen2Model

    from visor_lightning.models.visor_lm import VisorLanguageModel

    sec, fm = tiny
    emb, is_vis, mask = make_inputs(64, 8, 16, 1, torch.device("cpu"), torch.float32)
    nxt = torch.zeros(1, dtype=torch.long)

    def count(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fn()
        top = [e for e in p.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        return len(top)

    def counts(lm, layers: int, **kw) -> tuple[int, int]:
        with torch.inference_mode():
            cache = VisorCache(layers)
            lm(emb, is_vis, mask, cache=cache, last_only=True, **kw)
            return count(lambda: lm.decode_step(nxt, cache)), count(lambda: lm(emb, is_vis, mask, last_only=True, **kw))

    dense = {}
    for layers in (3, 6, 9):
        cfg = sec.backbone.to_hf_config().text_config
        cfg.num_hidden_layers, cfg.layer_types, cfg._attn_implementation = layers, ["full_attention"] * layers, "sdpa"
        torch.manual_seed(0)
        lm = VisorLanguageModel(Qwen2Model(cfg), torch.nn.Linear(64, cfg.vocab_size, bias=False), LayerSchedule.dense(layers))
        dense[layers] = counts(lm.eval(), layers)
    for layers, (decode, prefill) in dense.items():
        assert decode == layers * LAUNCHES_DECODE_LAYER + LAUNCHES_DECODE_FIXED, (layers, decode)
        assert prefill == layers * LAUNCHES_PREFILL_LAYER + LAUNCHES_PREFILL_FIXED, (layers, prefill)
    visor, _ = build_lms(sec, torch.device("cpu"), torch.float32)
    for cid in range(len(sec.schedule.feasible)):
        decode, prefill = counts(visor, 6, config_ids=torch.tensor([cid]))
        assert decode == 6 * LAUNCHES_DECODE_LAYER + 2 * LAUNCHES_CA + LAUNCHES_DECODE_FIXED
        want = 6 * LAUNCHES_PREFILL_LAYER + 2 * LAUNCHES_CA + LAUNCHES_PREFILL_FIXED + LAUNCHES_STREAMS
        assert prefill == pytest.approx(want, rel=0.1), (cid, prefill, want)


def test_profile_file_format_and_lookups(tmp_path):
    p = flat_profile()
    p.gemm = {"64x64": [[1, 1e9], [64, 4e9]], "64x256": [[1, 2e9], [4, 3e9]]}
    path = p.save(tmp_path / "p.json")
    q = DeviceProfile.load(path)
    assert q == p
    assert q.gemm_flops(8, 64, 64) == pytest.approx(1e9 + 3e9 * math.log(8) / math.log(64))  # log-linear in M
    assert q.gemm_flops(4, 64, 200) == 3e9  # nearest shape that covers M = 4
    assert q.gemm_flops(32, 64, 200) == pytest.approx(interpolate([[1, 1e9], [64, 4e9]], 32))  # 64x256 stops at M = 4
    assert interpolate([[2, 5.0], [8, 7.0]], 1) == 5.0 and interpolate([[2, 5.0], [8, 7.0]], 100) == 7.0
    # measured dips are noise: the fit pools them with their neighbours, never moves x, keeps rising tables
    assert nondecreasing([[1, 1.0], [2, 3.0], [4, 2.0], [8, 5.0]]) == [[1, 1.0], [2, 2.5], [4, 2.5], [8, 5.0]]
    assert nondecreasing([[1, 1.0], [2, 9.0], [4, 3.0], [8, 3.0]]) == [[1, 1.0], [2, 5.0], [4, 5.0], [8, 5.0]]
    assert nondecreasing([[1, 1.0], [4, 2.0]]) == [[1, 1.0], [4, 2.0]]
    d = json.loads(path.read_text())
    del d["bandwidth"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"bad.json: profile lacks field\(s\) \['bandwidth'\]"):
        DeviceProfile.load(tmp_path / "bad.json")
    d = json.loads(path.read_text()) | {"version": 0}
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="format version 0.*--force"):
        DeviceProfile.load(tmp_path / "old.json")
    h = datasheet_profile("h200-sxm")
    assert h.assumed and h.memory_bytes == 141e9 and "ASSUMED" in h.describe()
    with pytest.raises(ValueError, match="unknown datasheet GPU 'b300'"):
        datasheet_profile("b300")


def test_measured_profile_has_every_table_and_the_cli_caches_it(tmp_path, monkeypatch, capsys):
    prof = measure("cpu", "float32", shapes=((64, 64), (64, 256)), budget_s=3.0)
    assert not prof.assumed and prof.bandwidth > 0 and prof.op_overhead_s > 0 and prof.seconds < 30
    assert sorted(prof.gemm) == ["64x256", "64x64"] and all(len(t) >= 3 for t in prof.gemm.values())
    assert len(prof.sdpa) >= 2 and len(prof.sdpa_decode) == 4
    assert DeviceProfile.from_dict(json.loads(prof.to_json())) == prof
    monkeypatch.setenv("VISOR_PROFILE_DIR", str(tmp_path))
    assert main(["bench", "profile", "--datasheet", "h100-sxm", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["assumed"] and res["path"].startswith(str(tmp_path)) and DeviceProfile.load(res["path"]).name == "h100-sxm"


@pytest.mark.slow
def test_cached_device_profile_is_reused_by_default_and_measured_again_with_force(tiny, tmp_path, monkeypatch, capsys):
    """The default-profile path of `bench profile|train`: the cached file is what they use (a planted profile is
    recognisable by its numbers); `--force` measures this machine again and replaces it."""
    from visor_lightning.devprofile import default_path

    monkeypatch.setenv("VISOR_PROFILE_DIR", str(tmp_path))
    planted = flat_profile(1.234e10, 5.678e9, 9e-6)
    planted.save(default_path("cpu", "float32"))
    assert main(["bench", "profile", "--device", "cpu", "--json"]) == 0
    assert DeviceProfile.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "path"}) == planted
    assert main(["bench", "train", "--config", TINY, "--grid", "1x1", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["profile"] == planted.describe()
    sec, fm = tiny
    cm = CostModel(fm, planted, 4)
    r = next(r for r in res["rows"] if r["config"] == "sa[0]")
    nv = res["visual_tokens"]
    assert r["predicted_ms"] == pytest.approx(cm.train_step(fm.visual_keys((0,), nv), 64, batch=1,
                                                            trainable_params=r["trained_matrix_params"], ca_nv=nv).ms)
    assert main(["bench", "profile", "--device", "cpu", "--force", "--json"]) == 0
    measured = DeviceProfile.load(default_path("cpu", "float32"))
    assert measured != planted and not measured.assumed and measured.op_overhead_s > 0


def test_bench_serve_arithmetic(tiny, capsys):
    sec, fm = tiny
    assert main(["bench", "serve", "--config", TINY, "--grids", "1x1,2x2", "--memory-gb", "0.05", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [g["grid"] for g in res["grids"]] == ["1x1", "2x2"] and "ASSUMED" in res["profile"]
    g = res["grids"][1]
    rows = {r["config"]: r for r in g["rows"]}
    assert list(rows) == ["dense", "sa[0]", "sa[0,3]"]
    cm = CostModel(fm, datasheet_profile("h100-sxm"), 2, cat_appends=False, decode_launches=False)
    nv, ctx = g["visual_tokens"], 64 + 256 // 2
    for name, active in (("dense", None), ("sa[0]", (0,)), ("sa[0,3]", (0, 3))):
        r = rows[name]
        assert r["visual_kv_bytes"] == fm.visual_kv_bytes(active, nv, 2)
        assert r["kv_bytes_per_sequence"] == r["visual_kv_bytes"] + 6 * (64 + 256) * 2 * 32 * 2
        assert r["max_batch"] == int((0.05e9 - r["weight_bytes"]) // r["kv_bytes_per_sequence"]) > 0
        model = cm if active else CostModel(FlopsModel(sec.backbone, LayerSchedule.dense(6)), datasheet_profile("h100-sxm"), 2,
                                            cat_appends=False, decode_launches=False)
        step = model.decode_step(fm.visual_keys(active, nv), ctx, batch=32, ca_nv=nv if active else None)
        assert r["decode_tokens_per_s"]["32"] == pytest.approx(32 / step.seconds)
        assert r["ttft_ms"] > r["prefill_ms"] > 0
    assert rows["sa[0]"]["max_batch"] > rows["dense"]["max_batch"]  # the visual-KV saving buys sequences


def test_bench_train_rows_and_predictions(tiny, capsys, tmp_path):
    sec, fm = tiny
    prof = flat_profile(1e10, 1e10, 1e-6).save(tmp_path / "p.json")
    assert main(["bench", "train", "--config", TINY, "--grid", "1x1", "--repeats", "1", "--warmup", "0",
                 "--profile", str(prof), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "sa[0]", "sa[0,3]"]
    cm = CostModel(fm, DeviceProfile.load(prof), 4)
    # trained: every matrix but the (unused) input embedding; the dense row has no CA blocks to train
    assert rows["dense"]["trained_matrix_params"] == cm.weight_params(with_ca=False, embedding=False)
    assert rows["sa[0]"]["trained_matrix_params"] == cm.weight_params(with_ca=True, embedding=False)
    nv = res["visual_tokens"]
    pred = cm.train_step(fm.visual_keys((0,), nv), 64, batch=1, trainable_params=rows["sa[0]"]["trained_matrix_params"], ca_nv=nv)
    assert rows["sa[0]"]["predicted_ms"] == pytest.approx(pred.ms)
    assert all(r["median_ms"] > 0 for r in res["rows"])  # a timing: only that it was taken
