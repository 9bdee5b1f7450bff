"""``visor bench prefill|decode``: the table's analytic columns come from the FLOPs model, the measured ones are
real timings of the same weights (no timing is asserted: these machines are shared), and the visual KV the
decode bench measures in the cache equals the FLOPs model's count."""

from __future__ import annotations

import json

import pytest

from visor_lightning.cli import main
from visor_lightning.config import load_model_section
from visor_lightning.costmodel import CostModel
from visor_lightning.devprofile import DeviceProfile
from visor_lightning.flops import FlopsModel, Workload
from visor_lightning.models import LayerSchedule

TINY = "experiments/debug/tiny.yaml"


def _profile(tmp_path) -> str:
    """A hand-made profile, so the tests need not measure one (``tests/test_costmodel.py`` tests measuring)."""
    t = [[1, 1e9], [1e6, 2e10]]
    return str(DeviceProfile(name="test", device="cpu", dtype="float32", threads=2, assumed=True, bandwidth=1e10, elementwise=5e9, adamw_s_per_param=5e-9,
                             op_overhead_s=5e-6, gemm={"64x64": t}, sdpa=t, sdpa_decode=t).save(tmp_path / "prof.json"))


def _run(capsys, *args: str) -> dict:
    assert main(list(args) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_bench_rows_against_the_flops_model(capsys, kind, tmp_path):
    prof = _profile(tmp_path)
    res = _run(capsys, "bench", kind, "--config", TINY, "--repeats", "2", "--warmup", "0", "--fastv", "1",
               "--decode-tokens", "3", "--profile", prof)
    sec = load_model_section(TINY)
    fm, dense = FlopsModel(sec.backbone, sec.schedule, sec.policy_width), FlopsModel(sec.backbone, LayerSchedule.dense(6))
    nt, nv = 64, Workload().resolve_visual(sec.backbone)
    assert (res["text_tokens"], res["visual_tokens"], res["dtype"], res["device"]) == (nt, nv, "float32", "cpu")
    names = [r["config"] for r in res["rows"]]
    assert names[:3] == ["dense", "sa[0]", "sa[0,3]"] and len(names) == 5 and names[3].startswith("fastv(k=1,")
    rows = {r["config"]: r for r in res["rows"]}
    assert res["machine_speed_vs_profile"] > 0  # the probe ran against the given profile
    cm = CostModel(fm, DeviceProfile.load(prof), 4)
    dense_cm = CostModel(dense, DeviceProfile.load(prof), 4)
    # the measured columns are timings (never asserted: shared machines) and ratios of them; what is checked against
    # an independent quantity is every predicted and analytic column, and the KV bytes found in the real cache
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["median_ms"] >= r["min_ms"]
        assert sum(r["predicted_parts_ms"].values()) == pytest.approx(r["predicted_ms"])
    for name, model, keys, ca in (("dense", dense_cm, fm.visual_keys(None, nv), None), ("sa[0,3]", cm, fm.visual_keys((0, 3), nv), nv)):
        expect = (model.prefill(keys, nt, ca_nv=ca) if kind == "prefill" else model.decode(keys, nt, 3, ca_nv=ca)).ms
        assert rows[name]["predicted_ms"] == pytest.approx(expect)
    for i, active in enumerate(sec.schedule.feasible):
        name = names[1 + i]
        if kind == "prefill":
            expect = fm.prefill(None, nt, nv) / fm.prefill(active, nt, nv, routed=False)
        else:
            expect = fm.decode(None, nt, nv, 3) / fm.decode(active, nt, nv, 3)
        assert rows[name]["analytic_ratio"] == pytest.approx(expect)
        fastv = rows[names[3 + i]]  # FastV at this configuration's prefill FLOPs
        r = float(fastv["config"].split("r=")[1].split(")")[0])
        assert dense.fastv_prefill(nt, nv, 1, r) == pytest.approx(fm.prefill(active, nt, nv, routed=False), rel=0.02)
    if kind == "decode":
        for r in res["rows"]:
            assert r["tokens_per_s"] > 0
            assert r["measured_visual_kv_bytes"] == r["visual_kv_bytes"], r["config"]  # counted in the real cache
        assert rows["dense"]["visual_kv_bytes"] == fm.visual_kv_bytes(None, nv, 4)


def test_bench_table_and_pooling(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "prefill", "--config", TINY, "--repeats", "1", "--warmup", "0", "--token-pool", "4",
                 "--out", str(out), "--profile", _profile(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert ("| config | SA layers | median ms | predicted ms | measured / predicted | min / predicted | measured speed-up "
            "| analytic FLOPs ratio | measured / analytic |") in text
    assert "worst measured / predicted: " in text and "profile: test cpu float32 (ASSUMED" in text
    res = json.loads(out.read_text())
    sec = load_model_section(TINY)
    assert res["dense_visual_tokens"] == Workload().resolve_visual(sec.backbone) > res["visual_tokens"]
    assert main(["bench", "prefill", "--config", TINY, "--token-pool", "3"]) == 2
    assert "backbone.token_pool must be one of" in capsys.readouterr().err
