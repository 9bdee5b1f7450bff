"""The demo's findings (a)-(f) on hand-built rows: each verdict holds on a table made to pass and fails when one
clause is moved past its threshold (``summary.THRESHOLDS``), so a finding cannot print "holds" by accident."""

from __future__ import annotations

import copy

import pytest

from visor_lightning.commands.summary import THRESHOLDS as T
from visor_lightning.commands.summary import findings

TASKS = ("tally", "locate", "beside")


def _row(config, kind, easy, hard, *, swapped=(0.17, 0.21), gflops=(1.0, 1.0), **extra):
    row = {"config": config, "kind": kind, "acc": {"easy": easy, "hard": hard},
           "acc_swapped": {"easy": swapped[0], "hard": swapped[1]}, "gflops": {"easy": gflops[0], "hard": gflops[1]},
           "task_acc": {"shape": easy, "tally": hard, "locate": hard, "beside": hard}}
    row.update(extra)
    return row


def _world():
    """A table on which every guarded finding holds with room to spare."""
    rows = [
        _row("dense", "dense", 1.0, 0.62, gflops=(4.0, 4.0)),
        _row("dense_long", "dense", 1.0, 0.60, gflops=(4.0, 4.0)),
        _row("sa[]", "fixed", 0.6, 0.32, sa=0, gflops=(1.0, 1.0)),
        _row("sa[0]", "fixed", 1.0, 0.56, sa=1, gflops=(2.0, 2.0)),
        _row("sa[0,3]", "fixed", 1.0, 0.59, sa=2, gflops=(3.0, 3.0)),
        # the router: knob 0 keeps the maximal configuration's accuracy; knob 0.2 beats the hull on hard at the
        # FLOPs of a mix, with tally getting the most SA layers
        _row("router (max_acc_drop=0)", "sweep", 1.0, 0.59, knob=0.0, gflops=(2.5, 2.5),
             task_mean_sa={"shape": 1.0, "tally": 1.5, "locate": 1.0, "beside": 1.0}),
        _row("router (max_acc_drop=0.2)", "sweep", 0.6, 0.45, knob=0.2, gflops=(1.0, 1.2),
             task_mean_sa={"shape": 0.0, "tally": 1.0, "locate": 0.0, "beside": 0.0}),
        _row("fastv(k=1,r=0.9) ~ sa[0]", "fastv", 0.8, 0.31, matches=["sa[0]"], gflops=(2.0, 2.0)),
    ]
    baselines = {"easy": {"acc": 0.15}, "hard": {"acc": 0.20}}
    return rows, baselines


def _verdicts(rows, baselines):
    return {k: v["holds"] for k, v in findings(rows, baselines, {"easy": 4.0, "hard": 4.0}, None).items()}


def _set(rows, config, path, value):
    row = next(r for r in rows if r["config"] == config)
    *head, last = path
    for k in head:
        row = row[k]
    row[last] = value


def test_every_finding_holds_on_a_passing_table_and_reports_what_it_compares():
    rows, base = _world()
    found = findings(rows, base, {"easy": 4.0, "hard": 4.0}, None)
    assert {k: v["holds"] for k, v in found.items()} == {
        "a_models_see": True, "b_easy_needs_little": None, "c_hard_needs_sa": True, "d_one_network": True,
        "e_router": True, "f_token_pruning": None}
    assert found["a_models_see"]["values"]["hard_over_question_only"] == 3.1
    assert found["b_easy_needs_little"]["values"]["difference"] == 40.0
    assert found["c_hard_needs_sa"]["values"]["difference"] == 24.0
    assert found["e_router"]["values"]["knobs_beating_hull_with_tally_most_sa"] == ["0.2"]
    f = found["f_token_pruning"]["values"]
    assert f["at_flops_of"] == "sa[0]" and f["fastv_drop"] == {"easy": 20.0, "hard": 29.0}


# each case moves one clause just past its threshold: the finding must then fail (and only that one)
BREAKS = [
    ("a_models_see", "dense", ("acc_swapped", "hard"), 0.62 - T["sees_gap"] + 0.01),  # sees too little on hard
    ("a_models_see", "dense", ("acc", "easy"), T["easy_min"] - 0.01),
    ("a_models_see", "dense", ("acc", "hard"), 0.59),  # 2.95x the question-only baseline (< 3.0), still >= hard_min
    ("a_models_see", "sa[0]", ("acc_swapped", "easy"), 0.15 + T["swapped_near_baseline"] + 0.01),  # a VISOR row sees
    ("c_hard_needs_sa", "sa[0]", ("acc", "hard"), 0.32 + T["hard_sa_gain"] - 0.01),
    ("d_one_network", "dense_long", ("acc", "hard"), 0.59 + T["universal_vs_dense_long"] + 0.005),
    ("d_one_network", "dense_long", ("acc", "easy"), 1.0 - T["universal_vs_dense_long"] - 0.005),
    ("e_router", "router (max_acc_drop=0)", ("task_acc", "locate"), 0.59 * T["router_keep_strict"] - 0.001),
    ("e_router", "router (max_acc_drop=0)", ("acc", "easy"), T["router_keep_strict"] - 0.001),
    ("e_router", "router (max_acc_drop=0.2)", ("acc", "hard"), 0.32 + 0.24 * 0.2 + T["router_hull_gain"] - 0.005),
    ("e_router", "router (max_acc_drop=0.2)", ("acc", "easy"), 0.6 - T["router_easy_hull"] - 0.005),
    ("e_router", "router (max_acc_drop=0.2)", ("task_mean_sa", "locate"), 1.0),  # tally no longer gets the most SA
]


@pytest.mark.parametrize("name, config, path, value", BREAKS)
def test_each_clause_fails_its_finding_past_its_threshold(name, config, path, value):
    rows, base = _world()
    broken = copy.deepcopy(rows)
    _set(broken, config, path, value)
    got = _verdicts(broken, base)
    assert got[name] is False, (name, got)
    want = _verdicts(rows, base)
    assert {k: v for k, v in got.items() if k != name} == {k: v for k, v in want.items() if k != name}


def test_c_needs_a_ca_only_configuration_and_the_budget_baseline_moves_a():
    rows, base = _world()
    no_ca_only = [r for r in rows if r["config"] != "sa[]"]
    assert _verdicts(no_ca_only, base)["c_hard_needs_sa"] is False  # the cheapest has an SA layer: not the claim
    assert _verdicts(rows, {"easy": {"acc": 0.15}, "hard": {"acc": 0.21}})["a_models_see"] is False  # 2.95x
