"""The router (policy objective "correctness"): it learns which configuration gets a sample right, one knob
(``max_acc_drop``) trades accuracy for FLOPs at inference, and every entry point takes the knob."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visor_lightning.commands.summary import findings, hull_at, upper_hull
from visor_lightning.flops import FlopsModel
from visor_lightning.models import ScheduleConfig, VisorModel
from visor_lightning.models.policy import choose_by_correctness, correctness_loss, knob_target, parse_knob_target

from conftest import ROOT, image_batch, make_host, prompt_batch, wake_new_weights

NESTED = ScheduleConfig(num_ca=2, sa_layers=[0, 3, 5], always_on_sa=[], feasible=[[], [0], [0, 3], [0, 3, 5]])


def _marked_batch(model: VisorModel, n: int, seed: int):
    """Prompts of random text around one image; half carry a marker token (3 times) after the image, a visible
    feature the router reads before layer 0. Returns ids, mask, pixels, sizes and which rows are marked."""
    g = torch.Generator().manual_seed(seed)
    pixels, sizes, n_vis = image_batch(model, [(32, 32)] * n, seed=seed)
    ids, mask, _ = prompt_batch(model, n_vis, [4] * n, [6] * n, seed=seed)
    marked = torch.rand(n, generator=g) < 0.5
    marker = 7
    ids = ids.clone()
    ids[ids == marker] = marker + 1  # the marker appears only where placed
    ids[marked, -3:] = marker
    return ids, mask, pixels, sizes, marked


def test_router_learns_which_configuration_a_visible_feature_needs(spec):
    """CA-only answers unmarked samples and fails marked ones; every configuration with SA answers both. The
    trained router must send marked samples to sa[0] (the cheapest that is right) and the rest to CA-only."""
    torch.manual_seed(0)
    model = wake_new_weights(VisorModel(spec, NESTED, policy_width=32, host=make_host(spec)).eval())
    model.policy.head = "correctness"
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.policy.parameters():
        p.requires_grad_(True)
    ids, mask, pixels, sizes, marked = _marked_batch(model, 64, seed=1)
    correct = torch.ones(64, 4)
    correct[marked, 0] = 0.0  # CA-only is wrong exactly on the marked rows
    opt = torch.optim.Adam(model.policy.parameters(), lr=3e-3)
    with torch.no_grad():
        embeds, is_vis = model.embed(ids, pixels, sizes)
    for _ in range(150):
        loss = correctness_loss(model.lm(embeds, is_vis, mask, policy=model.policy, policy_only=True).policy_logits, correct)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    ids, mask, pixels, sizes, marked = _marked_batch(model, 48, seed=2)  # unseen samples
    assert 10 < int(marked.sum()) < 38
    _, chosen = model.generate(ids, pixels, sizes, mask, max_new_tokens=1, use_policy=True, max_acc_drop=0.2)
    want = torch.where(marked, 1, 0)  # sa[0] for marked rows, sa[] for the rest
    assert (chosen == want).float().mean() >= 0.95, (chosen.tolist(), marked.tolist())
    _, chosen = model.generate(ids, pixels, sizes, mask, max_new_tokens=1, use_policy=True, max_acc_drop=1.0)
    assert chosen.tolist() == [0] * 48  # the loosest knob: always the cheapest
    # the router's choice runs: a routed forward equals forcing those configurations
    routed = model(ids, pixels, sizes, mask, use_policy=True, last_only=True, max_acc_drop=0.2)
    forced = model(ids, pixels, sizes, mask, config_ids=routed.lm.config_ids, last_only=True)
    torch.testing.assert_close(routed.logits, forced.logits)


def test_loosening_the_knob_never_raises_flops(spec):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(512, 4, generator=g)
    sa = [0, 1, 2, 3]
    knobs = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    costs = torch.stack([torch.tensor(sa)[choose_by_correctness(logits, sa, 3, k)] for k in knobs])
    assert bool((costs[1:] <= costs[:-1]).all())  # per sample, not only on average
    assert costs[0].float().mean() > costs[-1].float().mean() and bool((costs[-1] == 0).all())
    # and in FLOPs, through the FLOPs model, on a model's real feasible set
    model = VisorModel(spec, NESTED, policy_width=32, host=None)
    fm = FlopsModel(spec, model.schedule, policy_width=32)
    mean = [sum(fm.prefill(model.schedule.feasible[c], 20, 40, routed=True) for c in choose_by_correctness(logits, sa, 3, k).tolist())
            for k in knobs]
    assert all(b <= a for a, b in zip(mean, mean[1:])) and mean[-1] < mean[0]


def test_the_knob_picks_the_cheapest_within_reach_of_the_maximal():
    logits = torch.logit(torch.tensor([[0.30, 0.90, 0.93, 0.94], [0.50, 0.52, 0.80, 0.94], [0.99, 0.20, 0.30, 0.40]]))
    sa = [0, 1, 2, 3]
    assert choose_by_correctness(logits, sa, 3, 0.0).tolist() == [3, 3, 0]
    assert choose_by_correctness(logits, sa, 3, 0.05).tolist() == [1, 3, 0]
    assert choose_by_correctness(logits, sa, 3, 0.15).tolist() == [1, 2, 0]
    assert choose_by_correctness(logits, sa, 3, 1.0).tolist() == [0, 0, 0]


def test_knob_errors_say_what_to_do(spec):
    model = VisorModel(spec, NESTED, policy_width=32, host=None)
    assert model.policy.head == "choice"
    with pytest.raises(ValueError, match="objective: correctness"):
        model.router(0.05)
    model.policy.head = "correctness"
    with pytest.raises(ValueError, match=r"max_acc_drop must be in \[0, 1\]"):
        model.router(1.5)
    assert parse_knob_target(knob_target(0.05)) == 0.05 and parse_knob_target("sa[0]") is None
    with pytest.raises(ValueError, match=r"policy\(max_acc_drop=X\)"):
        parse_knob_target("policy(drop=0.1)")


def test_upper_hull_is_the_concave_non_decreasing_frontier():
    pts = [(1.0, 30.0), (2.0, 90.0), (3.0, 92.0), (4.0, 91.0), (2.0, 50.0), (2.5, 60.0)]
    hull = upper_hull(pts)
    assert hull == [(1.0, 30.0), (2.0, 90.0), (3.0, 92.0)]
    assert hull_at(hull, 1.5) == pytest.approx(60.0) and hull_at(hull, 5.0) == 92.0 and hull_at(hull, 0.5) == 30.0


def _row(config, kind, easy, hard, g_easy, g_hard, tasks, sa=None, knob=None, task_sa=None, mean_sa=None):
    r = {"config": config, "kind": kind, "acc": {"easy": easy, "hard": hard}, "acc_swapped": {"easy": 0.15, "hard": 0.2},
         "gflops": {"easy": g_easy, "hard": g_hard}, "saving": {"easy": 1.0, "hard": 1.0}, "task_acc": tasks}
    if sa is not None:
        r["sa"] = sa
    if knob is not None:
        r["knob"], r["task_mean_sa"], r["mean_sa"] = knob, task_sa, mean_sa
    return r


def _rows(strict_tally: float, loose_hard: float, loose_tally_sa: float):
    t = lambda s, b, ta, lo, be: {"shape": s, "background": b, "tally": ta, "locate": lo, "beside": be}  # noqa: E731
    return [
        _row("sa[]", "fixed", 0.64, 0.32, 17, 17, t(0.51, 0.78, 0.26, 0.36, 0.34), sa=0),
        _row("sa[0]", "fixed", 1.00, 0.56, 22, 22, t(1, 1, 0.87, 0.42, 0.40), sa=1),
        _row("sa[0,3,5]", "fixed", 1.00, 0.57, 32, 32, t(1, 1, 0.88, 0.41, 0.42), sa=3),
        _row("router (max_acc_drop=0)", "sweep", 1.00, 0.57, 25, 25, t(1, 1, strict_tally, 0.42, 0.42), knob=0.0,
             task_sa=t(1, 1, 1.5, 1.5, 1.5), mean_sa={"easy": 1, "hard": 1.5}),
        _row("router (max_acc_drop=0.1)", "sweep", 0.82, loose_hard, 19.5, 18.7, t(0.75, 0.89, 0.86, 0.36, 0.34), knob=0.1,
             task_sa=t(0.5, 0.5, loose_tally_sa, 0.0, 0.0), mean_sa={"easy": 0.5, "hard": 0.33}),
    ]


@pytest.mark.parametrize("strict_tally,loose_hard,loose_tally_sa,holds", [
    (0.88, 0.52, 1.0, True),   # keeps 99% at knob 0; knob 0.1: hard 12 points over the hull, easy on it, tally most SA
    (0.80, 0.52, 1.0, False),  # knob 0 loses 9% of the maximal's tally accuracy
    (0.88, 0.40, 1.0, False),  # knob 0.1 only 0.6 points above the hull
    (0.88, 0.52, 0.0, False),  # knob 0.1 sends tally to CA-only like everything else: tally is not the SA-hungriest
    (0.88, 0.52, 0.5, False),  # tally ties with shape: "higher than every other task" fails
])
def test_router_finding_verdicts_on_hand_built_rows(strict_tally, loose_hard, loose_tally_sa, holds):
    rows = _rows(strict_tally, loose_hard, loose_tally_sa)
    base = {"easy": {"acc": 0.15}, "hard": {"acc": 0.2}}
    got = findings(rows, base, {"easy": 46, "hard": 46}, None)
    assert got["e_router"]["holds"] is holds, got["e_router"]["values"]
    # hull at 18.7 GFLOPs on hard: 32 + (56 - 32) * 1.7 / 5 = 40.16; the router's 52 is 11.8 above it
    assert got["e_router"]["values"]["per_knob"]["0.1"]["hard_minus_hull"] == round(100 * (loose_hard - 0.4016), 1)
    # (c): the best one-SA configuration on hard against CA-only: 56 - 32 = 24 points >= 8
    assert got["c_hard_needs_sa"]["holds"] is True and got["c_hard_needs_sa"]["values"]["difference"] == 24.0
    assert got["b_easy_needs_little"]["holds"] is None  # reported, not asserted


def test_hard_needs_sa_fails_below_eight_points():
    rows = _rows(0.88, 0.52, 1.0)
    rows[1]["acc"]["hard"] = 0.39  # sa[0] only 7 points above CA-only
    got = findings(rows, {"easy": {"acc": 0.15}, "hard": {"acc": 0.2}}, {"easy": 46, "hard": 46}, None)
    assert got["c_hard_needs_sa"]["holds"] is False and got["c_hard_needs_sa"]["values"]["difference"] == 7.0


@pytest.mark.slow
def test_visor_ask_answers_one_image(tiny_pipeline, tmp_path):
    import random

    from visor_lightning.data.scenes import make_scene

    img, qa, _ = make_scene("tally", random.Random(0), 32)
    path = tmp_path / "scene.png"
    img.save(path)
    out = tiny_pipeline["out"]
    cmd = [sys.executable, "-m", "visor_lightning", "ask", "--weights", str(out / "router" / "weights"),
           "--processor", str(out / "base" / "hf"), "--image", str(path), "--question", qa[0][0], "--max-acc-drop", "0.05"]
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    names = ["sa[]", "sa[0]", "sa[0,3]", "sa[0,3,5]"]
    assert res["config"] in names and res["chosen_by"] == "router" and res["max_acc_drop"] == 0.05
    assert list(res["predicted_correct_by_config"]) == names
    assert res["predicted_correct"] == res["predicted_correct_by_config"][res["config"]]
    assert 0 < res["gflops"] < res["dense_gflops"] and res["saving"] == pytest.approx(res["dense_gflops"] / res["gflops"])
    assert isinstance(res["answer"], str) and res["policy_trained"] is True
    text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert text.returncode == 0 and f"configuration: {res['config']}" in text.stdout and "fewer)" in text.stdout
    assert "UNTRAINED" not in text.stdout
    # universal weights: their router is its random init, and the answer says so
    raw = subprocess.run(cmd[:5] + [str(out / "universal" / "weights")] + cmd[6:-2], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert raw.returncode == 0 and "UNTRAINED: no policy stage has trained" in raw.stdout, raw.stderr[-2000:]
    # a classifier policy has no knob: one line that says what to do
    bad = subprocess.run(cmd[:5] + [str(out / "policy" / "weights")] + cmd[6:], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "objective: correctness" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_visor_eval_sweeps_the_knob_and_matches_routed_generation(tiny_pipeline, tmp_path, monkeypatch):
    from visor_lightning.commands.evaluate import run_eval

    monkeypatch.setenv("VISOR_DATA", str(tiny_pipeline["data"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline["uri"])
    out = tiny_pipeline["out"]
    cfg = str(ROOT / "experiments/debug/stage4_router.yaml")
    doc = run_eval([cfg], str(out / "router" / "weights"), targets="policy", out=str(tmp_path / "ev"), swap=False,
                   max_acc_drop=[0, 1])
    res = doc["results"]["hard"]
    assert set(res) == {"policy", "policy(max_acc_drop=0)", "policy(max_acc_drop=1)"}
    recs = {(r["target"], r["set"], r["id"]): r for r in doc["samples"]}
    for (t, s, i), r in recs.items():
        assert 0 <= r["predicted_correct"] <= 1
        if t == "policy(max_acc_drop=0)":  # answered from each configuration's pass == routed generation
            routed = recs[("policy", s, i)]
            assert (r["config"], r["prediction"]) == (routed["config"], routed["prediction"])
        if t == "policy(max_acc_drop=1)":
            assert r["config"] == "sa[]"
    assert res["policy(max_acc_drop=1)"]["gflops"] <= res["policy(max_acc_drop=0)"]["gflops"]
    # the weights say what their policy head is, whatever the stage config's objective (here: correctness)
    with pytest.raises(ValueError, match="objective: correctness"):
        run_eval([cfg], str(out / "policy" / "weights"), targets="policy", out=str(tmp_path / "ev2"), swap=False,
                 max_acc_drop=[0.1])


def test_answers_correct_counts_whole_answers_not_tokens():
    """Two answers of two tokens each (word + end of turn): answer-token accuracy credits the end-of-turn token
    of a wrong word; the router's target does not."""
    targets = torch.tensor([[-100, 5, 9, -100, -100, 6, 9], [-100, 5, 9, -100, -100, 6, 9]])
    pred = torch.tensor([[0, 5, 9, 0, 0, 7, 9], [0, 5, 9, 0, 0, 6, 9]])  # row 0: second word wrong
    logits = torch.nn.functional.one_hot(pred, 12).float()
    _, acc = VisorModel.answer_scores(logits, targets)
    assert acc.tolist() == [0.75, 1.0]
    assert VisorModel.answers_correct(logits, targets).tolist() == [0.5, 1.0]
    assert VisorModel.answers_correct(logits, torch.full_like(targets, -100)).tolist() == [0.0, 0.0]


def test_eval_knob_list_parses_and_names_the_flag():
    from visor_lightning.commands.evaluate import parse_knobs

    assert parse_knobs("0,0.05, 1") == [0.0, 0.05, 1.0] and parse_knobs(None) == []
    with pytest.raises(ValueError, match=r"--max-acc-drop '0,2'.*\[0, 1\]"):
        parse_knobs("0,2")


def test_pipeline_rejects_a_bad_sweep(tmp_path):
    from visor_lightning.commands.pipeline import load_pipeline

    text = (ROOT / "experiments/debug/pipeline.yaml").read_text().replace("max_acc_drop: [0, 0.02", "max_acc_drop: [-1, 0.02")
    bad = tmp_path / "pipeline.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=rf"{bad}: summary.max_acc_drop"):
        load_pipeline(bad)
