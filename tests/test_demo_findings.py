"""The embedded demo, run as `make demo` runs it, into a fresh directory and MLflow store: its models must see, and
the findings printed as holding must hold (issue "science"). A change that blinds the models fails here.

The findings' thresholds are ``visor_lightning.commands.summary.THRESHOLDS``, the numbers the printed table uses, so this
test is never weaker than the table: ``GUARDED`` lists every finding the committed demo prints as holding with a margin
beyond its noise (see the note above it). The others (docs/quickstart.md) are still computed and printed, and checked
here to be reported.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ("a_models_see", "b_easy_needs_little", "c_hard_needs_sa", "d_one_network", "e_router", "f_token_pruning")
# held on the committed demo on both seeds 0 and 1 of the whole pipeline (docs/quickstart.md): (a) 3.15x / 3.13x the
# hard question-only baseline (threshold 3.0), (c) 26.0 / 23.3 points (threshold 8); (e) on neither (its first clause:
# the strictest knob keeps 89.0% of `beside` on seed 0, 94.9% on seed 1). (d) prints as holding on both seeds (-0.9 /
# -0.3 points, threshold 3) but is not guarded: the previous version, whose training differed only in rounding (fused
# AdamW, the loss's LM head on answer tokens), printed -4.5 on seed 0, so its margin is within a kernel change's noise
GUARDED = ("a_models_see", "c_hard_needs_sa")
SEES = 0.10  # every trained row, each family: real - swapped accuracy (1,000 samples: 10 points is far beyond noise)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    from visor_lightning.commands.pipeline import load_pipeline, run_pipeline

    out = tmp_path_factory.mktemp("demo")
    env = {"VISOR_DATA": str(out / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_pipeline(ROOT / "experiments/debug/pipeline.yaml")
        cfg["out"], cfg["data"]["dir"] = str(out), env["VISOR_DATA"]
        t = time.perf_counter()
        assert run_pipeline(cfg) == 0
        seconds = time.perf_counter() - t
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return {"summary": json.loads((out / "summary.json").read_text()), "seconds": seconds, "out": out}


@pytest.mark.slow
def test_demo_models_see_and_the_controls_are_reported(demo):
    s = demo["summary"]
    for fam in ("easy", "hard"):
        b = s["baselines"][fam]
        # the evaluation sets: >= 1,000 held-out samples, question-only baseline near chance
        assert b["samples"] >= 1000 and b["acc"] <= 1.5 * b["chance"], (fam, b)
        assert b["counted_on"].endswith(f"{fam}_train-manifest.json")
        # every trained model sees: swapping the images costs it accuracy, on both families (finding (a)'s own
        # thresholds, 30 points and more, are printed and checked by the summary; see GUARDED)
        for r in s["rows"]:
            if r["kind"] != "fastv":
                assert r["acc"][fam] - r["acc_swapped"][fam] >= SEES, (fam, r["config"], r["acc"], r["acc_swapped"])
    assert set(s["findings"]) == set(FINDINGS)
    # the router's knob rows answer each sample with its chosen configuration's batch pass: on the trained demo they
    # equal routed generation (`policy`, knob 0) sample by sample, configurations and answers
    rc = s["router_check"]
    assert rc and rc["samples"] >= 4000 and rc["same_config"] == rc["same_answer"] == rc["samples"], rc
    for name, f in s["findings"].items():
        assert f["values"] and ("holds" if f["holds"] else "reported" if f["holds"] is None else "DOES NOT HOLD") in s["table"]


def _recomputed(name: str, s: dict) -> bool:
    """A guarded finding's verdict recomputed here from the printed rows and ``THRESHOLDS`` (not read back from the
    code that printed it): the finding's definition in docs/quickstart.md, as arithmetic."""
    from visor_lightning.commands.summary import THRESHOLDS as T

    rows = {r["config"]: r for r in s["rows"]}
    base = {f: b["acc"] for f, b in s["baselines"].items()}
    if name == "a_models_see":  # the dense base sees, well above the question-only baseline; no VISOR row sees swapped
        d = rows["dense"]
        visor = [r for r in s["rows"] if r["kind"] in ("fixed", "policy", "sweep")]
        return (all(d["acc"][f] - d["acc_swapped"][f] >= T["sees_gap"] for f in ("easy", "hard"))
                and d["acc"]["easy"] >= T["easy_min"] and d["acc"]["hard"] >= T["hard_min"]
                and d["acc"]["hard"] >= T["hard_over_baseline"] * base["hard"]
                and all(abs(r["acc_swapped"][f] - base[f]) <= T["swapped_near_baseline"] + 5e-4  # printed rounded
                        for r in visor for f in ("easy", "hard")))
    if name == "c_hard_needs_sa":  # on hard, the best fixed configuration with one SA layer beats CA only
        fixed = [r for r in s["rows"] if r["kind"] == "fixed"]
        ca_only = [r["acc"]["hard"] for r in fixed if r["sa"] == 0]
        one_sa = [r["acc"]["hard"] for r in fixed if r["sa"] == 1]
        return bool(ca_only and one_sa) and max(one_sa) - ca_only[0] >= T["hard_sa_gain"]
    raise AssertionError(f"no recomputation for {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", GUARDED)
def test_demo_finding_holds(demo, name):
    f = demo["summary"]["findings"][name]
    assert _recomputed(name, demo["summary"]) is True, (name, f["values"])
    assert f["holds"] is True, (name, f["values"])  # and the printed verdict says so


@pytest.mark.slow
def test_demo_reports_its_time_per_stage(demo):
    # the budget (15 minutes on 2 cores) is reported, not asserted: these machines are shared and noisy
    seconds = demo["summary"]["seconds"]
    assert {"base", "ca_pretrain", "full_finetune", "universal", "dense_long", "router", "policy", "policy_budget",
            "evaluation", "total"} <= set(seconds)
    assert "seconds per stage:" in demo["summary"]["table"]
