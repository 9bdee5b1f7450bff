"""The pipeline's summary: one row per target on the evaluation sets, the controls, and the paper's findings
checked in miniature (issue "science"; thresholds in :data:`THRESHOLDS`, never tuned to the results).

Rows come from ``visor eval`` documents (``evaluate.run_eval``): accuracy with real and with swapped images,
prefill GFLOPs and saving vs the dense base, and for policies the mean number of SA layers they chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

THRESHOLDS = {
    "sees_gap": 0.30,  # (a) dense base: real - swapped accuracy, each family
    "easy_min": 0.85,  # (a) dense base on easy
    "hard_min": 0.50,  # (a) dense base on hard
    "hard_over_baseline": 3.0,  # (a) dense base on hard vs the question-only baseline
    "swapped_near_baseline": 0.10,  # (a) every VISOR row: |swapped - question-only baseline|
    "easy_cheap_gap": 0.02,  # (b) easy: maximal - cheapest
    "hard_sa_gain": 0.08,  # (c) hard: maximal - cheapest
    "hard_monotone": 0.015,  # (c) best with k SA layers >= best with k-1 minus this
    "universal_vs_dense_long": 0.03,  # (d) |maximal - dense trained as long|, each family
    "router_sa_gap": 0.5,  # (e) pseudo-label policy: mean SA layers hard - easy
    "router_keep": 0.97,  # (e) policy accuracy >= this x the maximal configuration's, each family
    "router_saving_gain": 1.25,  # (e) policy saving >= this x the maximal configuration's
    "budget_tolerance": 0.10,  # (e) budget policy saving within this fraction of its target
}


def sa_count(config: str) -> int:
    """``sa[0,3]`` -> 2, ``sa[]`` -> 0."""
    inner = config[config.index("[") + 1 : config.rindex("]")]
    return len([x for x in inner.split(",") if x.strip()])


def mean_sa(doc: dict[str, Any], target: str, family: str) -> float:
    """Mean SA layers the policy chose on ``family`` (real images), from the per-sample records."""
    picked = [sa_count(r["config"]) for r in doc["samples"] if r["target"] == target and r["set"] == family and not r["swapped"]]
    return sum(picked) / max(1, len(picked))


def target_row(label: str, kind: str, doc: dict[str, Any], target: str, dense_gflops: dict[str, float]) -> dict[str, Any]:
    res = doc["results"]
    sets = [s for s in res if target in res[s]]
    row = {"config": label, "kind": kind,
           "acc": {s: res[s][target]["acc"] for s in sets},
           "acc_swapped": {s: res[s][target].get("acc_swapped") for s in sets},
           "gflops": {s: res[s][target]["gflops"] for s in sets},
           "saving": {s: dense_gflops[s] / res[s][target]["gflops"] for s in sets}}
    if kind == "fixed":
        row["sa"] = sa_count(target)
    if kind == "policy":
        row["mean_sa"] = {s: mean_sa(doc, target, s) for s in sets}
        row["choice"] = {s: res[s][target].get("choice") for s in sets}
    return row


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
        visor = fixed + policies
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
        cheap = min(fixed, key=lambda r: sum(r["gflops"].values()))
        full = max(fixed, key=lambda r: (r["sa"], sum(r["gflops"].values())))
        d_easy = full["acc"][easy] - cheap["acc"][easy]
        out["b_easy_needs_little"] = {"holds": d_easy <= T["easy_cheap_gap"], "values": {
            "cheapest": cheap["config"], "maximal": full["config"], "cheapest_acc": pts(cheap["acc"][easy]),
            "maximal_acc": pts(full["acc"][easy]), "maximal_minus_cheapest": pts(d_easy)}}
        d_hard = full["acc"][hard] - cheap["acc"][hard]
        best: dict[int, float] = {}
        for r in fixed:
            best[r["sa"]] = max(best.get(r["sa"], 0.0), r["acc"][hard])
        ks = sorted(best)
        drops = {f"{k}_vs_{j}": pts(best[k] - best[j]) for j, k in zip(ks, ks[1:])}
        monotone = all(best[k] >= best[j] - T["hard_monotone"] for j, k in zip(ks, ks[1:]))
        out["c_hard_needs_sa"] = {"holds": d_hard >= T["hard_sa_gain"] and monotone, "values": {
            "cheapest_acc": pts(cheap["acc"][hard]), "maximal_acc": pts(full["acc"][hard]),
            "maximal_minus_cheapest": pts(d_hard), "best_by_sa_layers": {k: pts(v) for k, v in best.items()},
            "best_k_minus_best_k_minus_1": drops}}
        long = by.get("dense_long")
        if long:
            diff = {f: full["acc"][f] - long["acc"][f] for f in fams}
            out["d_one_network"] = {"holds": all(abs(v) <= T["universal_vs_dense_long"] for v in diff.values()),
                                    "values": {"maximal_minus_dense_long": {f: pts(v) for f, v in diff.items()}}}
        label = next((p for p in policies if p.get("objective") == "pseudo_label"), None)
        budget = next((p for p in policies if p.get("objective") == "budget"), None)
        if label:
            sa_gap = label["mean_sa"][hard] - label["mean_sa"][easy]
            keep = {f: label["acc"][f] / max(full["acc"][f], 1e-9) for f in fams}
            sav, sav_full = overall_saving(label, dense_gflops), overall_saving(full, dense_gflops)
            holds = (sa_gap >= T["router_sa_gap"] and all(k >= T["router_keep"] for k in keep.values())
                     and sav >= T["router_saving_gain"] * sav_full)
            values = {"mean_sa": {f: round(label["mean_sa"][f], 2) for f in fams}, "hard_minus_easy": round(sa_gap, 2),
                      "acc_over_maximal": {f: round(k, 3) for f, k in keep.items()}, "saving": round(sav, 2),
                      "maximal_saving": round(sav_full, 2), "saving_over_maximal": round(sav / sav_full, 2)}
            if budget and budget_target:
                got = overall_saving(budget, dense_gflops)
                ok = abs(got / budget_target - 1) <= T["budget_tolerance"]
                holds = holds and ok
                values.update({"budget_target": budget_target, "budget_saving": round(got, 2),
                               "budget_off_by": round(got / budget_target - 1, 3)})
            out["e_router"] = {"holds": holds, "values": values}
        fastv = next((r for r in rows if r["kind"] == "fastv" and cheap["config"] in r.get("matches", [])), None)
        ref = long or dense
        if fastv and ref:
            out["f_token_pruning"] = {"holds": None, "values": {
                "reference": ref["config"], "at_flops_of": cheap["config"],
                "fastv_drop": {f: pts(ref["acc"][f] - fastv["acc"][f]) for f in fams},
                "visor_drop": {f: pts(ref["acc"][f] - cheap["acc"][f]) for f in fams}}}
    return out


def table(rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]],
          dense_gflops: dict[str, float], seconds: dict[str, float] | None = None) -> str:
    fams = list(baselines)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    head = ["config"]
    for f in fams:
        head += [f"{f} acc", f"{f} swapped"]
    head += [f"mean SA {f}" for f in fams] + ["prefill GFLOPs/sample", "saving vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"]]
        for f in fams:
            cells += [pct(r["acc"].get(f)), pct(r["acc_swapped"].get(f))]
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
    """Accuracy vs prefill GFLOPs per family: fixed configurations (dots), swapped-image accuracy (hollow),
    dense rows (squares), FastV (crosses), policies (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visor_lightning.callbacks.mlflow_artifacts import label_axis, save_figure

    fams = list(rows[0]["acc"])
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4.5), squeeze=False)
    style = {"dense": ("s", "black"), "fixed": ("o", "tab:blue"), "policy": ("*", "tab:red"), "fastv": ("x", "tab:green")}
    for ax, f in zip(axes[0], fams):
        for r in rows:
            marker, colour = style[r["kind"]]
            x, y = r["gflops"][f], 100 * r["acc"][f]
            ax.scatter(x, y, marker=marker, color=colour, s=160 if marker == "*" else 60, zorder=3)
            ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            if r["acc_swapped"].get(f) is not None:
                y = 100 * r["acc_swapped"][f]
                if marker == "x":  # an unfilled marker: no hollow version
                    ax.scatter(x, y, marker="+", color=colour, s=50, alpha=0.6, zorder=2)
                else:
                    ax.scatter(x, y, marker=marker, facecolors="none", edgecolors=colour, s=50, alpha=0.6, zorder=2)
        label_axis(ax, f"{f}: filled = real images, hollow = swapped images")
    return save_figure(fig, out)
