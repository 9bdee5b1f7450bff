"""The pipeline's summary: one row per target on the evaluation sets, the controls, and the paper's findings
checked in miniature (issue "science"; thresholds in :data:`THRESHOLDS`, never tuned to the results).

Rows come from ``visor eval`` documents (``evaluate.run_eval``): accuracy with real and with swapped images,
prefill GFLOPs and saving vs the dense base, and for policies the mean number of SA layers they chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

THRESHOLDS = {  # registered before any run of the [router] demo (issue 26); never moved after seeing an evaluation set
    "sees_gap": 0.30,  # (a) dense base: real - swapped accuracy, each family
    "easy_min": 0.85,  # (a) dense base on easy
    "hard_min": 0.50,  # (a) dense base on hard
    "hard_over_baseline": 3.0,  # (a) dense base on hard vs the question-only baseline
    "swapped_near_baseline": 0.10,  # (a) every VISOR row: |swapped - question-only baseline|
    "hard_sa_gain": 0.08,  # (c) hard: best configuration with one SA layer - CA-only
    "universal_vs_dense_long": 0.03,  # (d) |maximal - dense trained as long|, each family
    "router_keep_strict": 0.99,  # (e) router at its strictest knob: >= this x the maximal's, each family and task
    "router_hull_gain": 0.05,  # (e) router on hard: >= the fixed configurations' upper hull + this, same FLOPs
    "router_easy_hull": 0.01,  # (e) ... while on easy it stays within this of that hull
}


def question_task(task: str, question: str) -> str:
    """The per-task column a sample counts in: its scene task, with the easy family's two questions apart
    ("shape": the shape's colour, "background": the background's)."""
    if task == "shape" and "background" in question.lower():
        return "background"
    return task or "?"


TASK_ORDER = ("shape", "background", "tally", "locate", "beside")


def sa_count(config: str) -> int:
    """``sa[0,3]`` -> 2, ``sa[]`` -> 0."""
    inner = config[config.index("[") + 1 : config.rindex("]")]
    return len([x for x in inner.split(",") if x.strip()])


def mean_sa(doc: dict[str, Any], target: str, family: str) -> float:
    """Mean SA layers the policy chose on ``family`` (real images), from the per-sample records."""
    picked = [sa_count(r["config"]) for r in doc["samples"] if r["target"] == target and r["set"] == family and not r["swapped"]]
    return sum(picked) / max(1, len(picked))


def per_task(doc: dict[str, Any], target: str) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy, mean SA layers chosen) per task of ``target``, real images, from the per-sample records."""
    hits: dict[str, list[float]] = {}
    sa: dict[str, list[int]] = {}
    for r in doc.get("samples", []):
        if r["target"] == target and not r["swapped"]:
            t = question_task(r.get("task", ""), r.get("question", ""))
            hits.setdefault(t, []).append(float(r["correct"]))
            if r["config"].startswith("sa["):
                sa.setdefault(t, []).append(sa_count(r["config"]))
    order = [t for t in TASK_ORDER if t in hits] + sorted(set(hits) - set(TASK_ORDER))
    return ({t: sum(hits[t]) / len(hits[t]) for t in order},
            {t: sum(sa[t]) / len(sa[t]) for t in order if sa.get(t)})


def target_row(label: str, kind: str, doc: dict[str, Any], target: str, dense_gflops: dict[str, float]) -> dict[str, Any]:
    res = doc["results"]
    sets = [s for s in res if target in res[s]]
    row = {"config": label, "kind": kind,
           "acc": {s: res[s][target]["acc"] for s in sets},
           "acc_swapped": {s: res[s][target].get("acc_swapped") for s in sets},
           "gflops": {s: res[s][target]["gflops"] for s in sets},
           "saving": {s: dense_gflops[s] / res[s][target]["gflops"] for s in sets}}
    row["task_acc"], task_sa = per_task(doc, target)
    if kind == "fixed":
        row["sa"] = sa_count(target)
    if kind in ("policy", "sweep"):
        row["mean_sa"] = {s: mean_sa(doc, target, s) for s in sets}
        row["task_mean_sa"] = task_sa
        row["choice"] = {s: res[s][target].get("choice") for s in sets}
    return row


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The fixed configurations' accuracy frontier over FLOPs: the upper concave hull of (FLOPs, accuracy), made
    non-decreasing (spending more can always run a cheaper configuration). Mixing two configurations at random
    reaches any point on a hull segment, so a router earns its place only above it."""
    top: dict[float, float] = {}
    for x, y in points:  # equal FLOPs: only the more accurate configuration can be on the frontier
        top[x] = max(y, top.get(x, y))
    pts = sorted(top.items())
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] is on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    best = max(range(len(hull)), key=lambda i: (hull[i][1], -hull[i][0]))
    return hull[: best + 1]


def hull_at(hull: list[tuple[float, float]], x: float) -> float:
    """The hull's accuracy at FLOPs ``x`` (flat beyond its ends: below the cheapest point, its accuracy)."""
    if x <= hull[0][0]:
        return hull[0][1]
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x <= x2:
            return y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    return hull[-1][1]


def overall_saving(row: dict[str, Any], dense_gflops: dict[str, float]) -> float:
    """Dense FLOPs over the row's, both summed over the families (equal-sized sets: a per-sample average)."""
    return sum(dense_gflops[s] for s in row["gflops"]) / sum(row["gflops"].values())


def findings(rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], dense_gflops: dict[str, float],
             budget_target: float | None, easy: str = "easy", hard: str = "hard") -> dict[str, dict[str, Any]]:
    """(a)-(f): each ``{"holds": bool | None, "values": {...}}`` (None: reported, no threshold)."""
    T = THRESHOLDS
    by = {r["config"]: r for r in rows}
    fams = (easy, hard)
    out: dict[str, dict[str, Any]] = {}
    base = baselines

    def pts(x: float) -> float:
        return round(100 * x, 1)

    dense = by.get("dense")
    fixed = [r for r in rows if r["kind"] == "fixed"]
    policies = [r for r in rows if r["kind"] == "policy"]
    if dense:
        gap = {f: dense["acc"][f] - dense["acc_swapped"][f] for f in fams}
        visor = [r for r in rows if r["kind"] in ("fixed", "policy", "sweep")]
        far = {r["config"]: {f: pts(r["acc_swapped"][f] - base[f]["acc"]) for f in fams} for r in visor}
        holds = (all(gap[f] >= T["sees_gap"] for f in fams) and dense["acc"][easy] >= T["easy_min"]
                 and dense["acc"][hard] >= T["hard_min"]
                 and dense["acc"][hard] >= T["hard_over_baseline"] * base[hard]["acc"]
                 and all(abs(v) <= 100 * T["swapped_near_baseline"] for d in far.values() for v in d.values()))
        out["a_models_see"] = {"holds": holds, "values": {
            "dense_acc": {f: pts(dense["acc"][f]) for f in fams}, "dense_swapped": {f: pts(dense["acc_swapped"][f]) for f in fams},
            "dense_gap": {f: pts(gap[f]) for f in fams}, "question_only": {f: pts(base[f]["acc"]) for f in fams},
            "hard_over_question_only": round(dense["acc"][hard] / max(base[hard]["acc"], 1e-9), 2),
            "visor_swapped_minus_question_only": far}}
    if fixed:
        cheap = min(fixed, key=lambda r: (r["sa"], sum(r["gflops"].values())))
        full = max(fixed, key=lambda r: (r["sa"], sum(r["gflops"].values())))
        best: dict[int, dict[str, Any]] = {}
        for r in fixed:
            if r["sa"] not in best or r["acc"][hard] > best[r["sa"]]["acc"][hard]:
                best[r["sa"]] = r
        one = best.get(cheap["sa"] + 1)
        if one is not None:
            out["b_easy_needs_little"] = {"holds": None, "values": {
                "cheapest": cheap["config"], "against": one["config"], "cheapest_acc": pts(cheap["acc"][easy]),
                "against_acc": pts(one["acc"][easy]), "difference": pts(one["acc"][easy] - cheap["acc"][easy]),
                "paper": "CA only 63.3 against 63.6 (full)"}}
            d_hard = one["acc"][hard] - cheap["acc"][hard]
            out["c_hard_needs_sa"] = {"holds": cheap["sa"] == 0 and d_hard >= T["hard_sa_gain"], "values": {
                "ca_only": cheap["config"], "ca_only_acc": pts(cheap["acc"][hard]), "best_one_sa": one["config"],
                "best_one_sa_acc": pts(one["acc"][hard]), "difference": pts(d_hard),
                "best_by_sa_layers": {k: pts(r["acc"][hard]) for k, r in sorted(best.items())}}}
        long = by.get("dense_long")
        if long:
            diff = {f: full["acc"][f] - long["acc"][f] for f in fams}
            out["d_one_network"] = {"holds": all(abs(v) <= T["universal_vs_dense_long"] for v in diff.values()),
                                    "values": {"maximal_minus_dense_long": {f: pts(v) for f, v in diff.items()}}}
        sweep = sorted((r for r in rows if r["kind"] == "sweep"), key=lambda r: r["knob"])
        if sweep:
            out["e_router"] = router_finding(sweep, fixed, full, policies, dense_gflops, budget_target, easy, hard)
        # FastV at the cheapest fixed configuration it can match (it cannot get as cheap as CA-only: its first
        # layers see every visual token)
        peers = [(r, next((x for x in fixed if x["config"] in r.get("matches", [])), None)) for r in rows if r["kind"] == "fastv"]
        peers = sorted(((f, x) for f, x in peers if x is not None), key=lambda p: (p[1]["sa"], sum(p[1]["gflops"].values())))
        ref = long or dense
        if peers and ref:
            fastv, like = peers[0]
            out["f_token_pruning"] = {"holds": None, "values": {
                "reference": ref["config"], "at_flops_of": like["config"],
                "fastv_drop": {f: pts(ref["acc"][f] - fastv["acc"][f]) for f in fams},
                "visor_drop": {f: pts(ref["acc"][f] - like["acc"][f]) for f in fams}}}
    return out


def routed_agreement(doc: dict[str, Any], knob0: str) -> dict[str, int] | None:
    """How often ``policy`` (routed generation, the router at its default knob 0) and ``knob0`` (the same knob,
    each sample answered by its chosen configuration's batch-wide pass) pick the same configuration and answer."""
    key = lambda r: (r["set"], r["swapped"], r["id"])  # noqa: E731
    a = {key(r): r for r in doc.get("samples", []) if r["target"] == "policy"}
    b = {key(r): r for r in doc.get("samples", []) if r["target"] == knob0}
    both = set(a) & set(b)
    if not both:
        return None
    return {"samples": len(both), "same_config": sum(a[k]["config"] == b[k]["config"] for k in both),
            "same_answer": sum(a[k]["prediction"] == b[k]["prediction"] for k in both)}


def router_finding(sweep: list[dict[str, Any]], fixed: list[dict[str, Any]], full: dict[str, Any],
                   policies: list[dict[str, Any]], dense_gflops: dict[str, float], budget_target: float | None,
                   easy: str, hard: str) -> dict[str, Any]:
    """(e) the router earns its place: (1) at its strictest knob it keeps >= 99% of the maximal configuration's
    accuracy on each family and task; (2) at some knob its hard accuracy beats the fixed configurations' upper
    hull at the same mean prefill FLOPs by >= 5 points while easy stays within 1 point of that hull; (3) at that
    knob its mean SA layers on tally exceed every other task's. The paper's policies are reported beside it."""
    T = THRESHOLDS

    def pts(x: float) -> float:
        return round(100 * x, 1)

    strict = sweep[0]
    pairs = {f: (strict["acc"][f], full["acc"][f]) for f in (easy, hard)}
    pairs.update({t: (strict["task_acc"][t], a) for t, a in full["task_acc"].items() if t in strict["task_acc"]})
    kept = all(got >= T["router_keep_strict"] * ref for got, ref in pairs.values())
    keep = {k: round(got / ref, 3) if ref else None for k, (got, ref) in pairs.items()}
    hulls = {f: upper_hull([(r["gflops"][f], r["acc"][f]) for r in fixed]) for f in (easy, hard)}
    per_knob = {}
    for r in sweep:
        gain = {f: r["acc"][f] - hull_at(hulls[f], r["gflops"][f]) for f in (easy, hard)}
        beats = gain[hard] >= T["router_hull_gain"] and gain[easy] >= -T["router_easy_hull"]
        sa = r.get("task_mean_sa", {})
        tally_first = "tally" in sa and all(sa["tally"] > v for t, v in sa.items() if t != "tally")
        per_knob[f"{r['knob']:g}"] = {"hard_minus_hull": pts(gain[hard]), "easy_minus_hull": pts(gain[easy]),
                                      "beats_hull": beats, "mean_sa_by_task": {t: round(v, 2) for t, v in sa.items()},
                                      "tally_most_sa": tally_first}
    good = [k for k, v in per_knob.items() if v["beats_hull"] and v["tally_most_sa"]]
    values: dict[str, Any] = {
        "strictest_knob": strict["knob"], "strictest_over_maximal": keep,
        "strictest_keeps": kept, "knobs_beating_hull_with_tally_most_sa": good, "per_knob": per_knob}
    for p in policies:  # the paper's objectives, reported: how far they collapse
        key = "pseudo_label_policy" if p.get("objective") == "pseudo_label" else "budget_policy"
        values[key] = {"mean_sa": {f: round(p["mean_sa"][f], 2) for f in (easy, hard)},
                       "mean_sa_by_task": {t: round(v, 2) for t, v in p.get("task_mean_sa", {}).items()},
                       "hard_over_maximal": round(p["acc"][hard] / full["acc"][hard], 3) if full["acc"][hard] else None,
                       "saving": round(overall_saving(p, dense_gflops), 2)}
        if p.get("objective") == "budget" and budget_target:
            values[key]["target_saving"] = budget_target
    return {"holds": kept and bool(good), "values": values}


def table(rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]],
          dense_gflops: dict[str, float], seconds: dict[str, float] | None = None) -> str:
    fams = list(baselines)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    tasks = [t for t in TASK_ORDER if any(t in r.get("task_acc", {}) for r in rows)]
    head = ["config"]
    for f in fams:
        head += [f"{f} acc", f"{f} swapped"]
    head += tasks + [f"mean SA {f}" for f in fams] + ["prefill GFLOPs/sample", "saving vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"]]
        for f in fams:
            cells += [pct(r["acc"].get(f)), pct(r["acc_swapped"].get(f))]
        cells += [pct(r.get("task_acc", {}).get(t)) for t in tasks]
        cells += [f"{r['mean_sa'][f]:.2f}" if "mean_sa" in r else "-" for f in fams]
        g = sum(r["gflops"].values()) / len(r["gflops"])
        cells += [f"{g:.4f}", f"{overall_saving(r, dense_gflops):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for f, b in baselines.items():
        lines.append(f"question-only baseline, {f}: {pct(b['acc'])}% (uniform-answer chance {pct(b['chance'])}%, "
                     f"{b['samples']} samples, majority answer per question counted on {b['counted_on']})")
    lines.append("")
    lines.append("findings:")
    for name, fnd in found.items():
        verdict = "reported" if fnd["holds"] is None else ("holds" if fnd["holds"] else "DOES NOT HOLD")
        lines.append(f"- {name}: {verdict}: {fnd['values']}")
    if seconds:
        lines.append("")
        lines.append("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Accuracy vs prefill GFLOPs per family: fixed configurations (dots) and their upper hull (dashed), the
    router's knob sweep (a red curve), swapped-image accuracy (hollow), dense rows (squares), FastV (crosses),
    the paper's policies (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visor_lightning.callbacks.mlflow_artifacts import label_axis, save_figure

    fams = list(rows[0]["acc"])
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4.5), squeeze=False)
    style = {"dense": ("s", "black"), "fixed": ("o", "tab:blue"), "policy": ("*", "tab:purple"), "fastv": ("x", "tab:green"),
             "sweep": (".", "tab:red")}
    for ax, f in zip(axes[0], fams):
        fixed = [(r["gflops"][f], 100 * r["acc"][f]) for r in rows if r["kind"] == "fixed"]
        if fixed:
            hull = upper_hull(fixed)
            ax.plot([x for x, _ in hull], [y for _, y in hull], "--", color="tab:blue", alpha=0.6, label="fixed configurations' upper hull")
        sweep = sorted((r for r in rows if r["kind"] == "sweep"), key=lambda r: r["knob"])
        if sweep:
            ax.plot([r["gflops"][f] for r in sweep], [100 * r["acc"][f] for r in sweep], "-o", color="tab:red", ms=4,
                    label="router, max_acc_drop sweep", zorder=4)
            for r in (sweep[0], sweep[-1]):
                ax.annotate(f"max_acc_drop={r['knob']:g}", (r["gflops"][f], 100 * r["acc"][f]), textcoords="offset points",
                            xytext=(5, -10), fontsize=7, color="tab:red")
        for r in rows:
            marker, colour = style[r["kind"]]
            x, y = r["gflops"][f], 100 * r["acc"][f]
            if r["kind"] != "sweep":
                ax.scatter(x, y, marker=marker, color=colour, s=160 if marker == "*" else 60, zorder=3)
                ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            if r["acc_swapped"].get(f) is not None:
                y = 100 * r["acc_swapped"][f]
                if marker == "x":  # an unfilled marker: no hollow version
                    ax.scatter(x, y, marker="+", color=colour, s=50, alpha=0.6, zorder=2)
                else:
                    ax.scatter(x, y, marker="o" if marker == "." else marker, facecolors="none", edgecolors=colour,
                               s=50 if marker != "." else 20, alpha=0.6, zorder=2)
        if fixed or any(r["kind"] == "sweep" for r in rows):
            ax.legend(fontsize=7, loc="center right")
        label_axis(ax, f"{f}: filled = real images, hollow = swapped images")
    return save_figure(fig, out)
