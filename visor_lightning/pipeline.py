"""``visor pipeline``: build the data, run every stage in order with the weights handed over, and summarise.

One MLflow parent run holds the data counts and the summary; each stage is a nested run (``visor fit``
underneath, same code path as running the stages by hand). A stage whose ``weights/visor.json`` exists is
skipped, so re-running an interrupted pipeline continues where it stopped (``--restart`` redoes everything).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from .lit.tracking import PARENT_ENV, code_version, run_name, tracking_uri

STAGE_KEYS = {"name", "config", "from", "args"}


def load_pipeline(path: str | Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config {str(path)!r} does not exist")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("out", "stages"):
        if key not in cfg:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    unknown = set(cfg) - {"out", "experiment", "data", "stages", "summary"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    bad = set(cfg.get("summary") or {}) - {"dense", "visor", "fastv"}
    if bad:
        raise ValueError(f"{path}: unknown key(s) summary.{sorted(bad)}; expected dense, visor, fastv")
    names = []
    for i, st in enumerate(cfg["stages"]):
        bad = set(st) - STAGE_KEYS
        if bad or "name" not in st or "config" not in st:
            raise ValueError(f"{path}: stages[{i}] needs name and config (optional: from, args); unknown {sorted(bad)}")
        if not Path(st["config"]).is_file():
            raise FileNotFoundError(f"{path}: stages[{i}].config {st['config']!r} does not exist")
        src = st.get("from")
        if src is not None and src.split(":")[0] not in names:
            raise ValueError(f"{path}: stages[{i}].from {src!r} names no earlier stage (have {names})")
        names.append(st["name"])
    return cfg


def build_data(spec: dict[str, Any], restart: bool) -> dict[str, Any]:
    """Every ``data.builds`` entry (skipped when its manifest has the same arguments) and the tokenizer."""
    from .data.build import builder_args, run_build
    from .data.report import log_counts_to_mlflow, manifest_counts
    from .data.shards import manifest_path, read_manifest, split_urls
    from .data.tokenizer import conversation_texts, train_tokenizer

    out = Path(spec["dir"])
    manifests = {}
    for i, b in enumerate(spec.get("builds", [])):
        args = build_args(b, out, where=f"data.builds[{i}]")
        wanted = builder_args(args)
        if not restart and manifest_path(out, b["split"]).is_file():
            have = read_manifest(out, b["split"])
            if {k: have["builder"].get(k) for k in wanted} == wanted:
                print(f"data: {b['split']} already built ({have['written']} samples), kept")
                log_counts_to_mlflow(f"data/{b['split']}", manifest_counts(have))
                manifests[b["split"]] = have
                continue
        run_build(args)
        manifests[b["split"]] = read_manifest(out, b["split"])
    tok = spec.get("tokenizer")
    if tok:
        tok_dir = out / "tokenizer"
        if restart or not (tok_dir / "tokenizer.json").is_file():
            urls = [u for s in tok["splits"] for u in split_urls(out, s)]
            t = train_tokenizer(conversation_texts(urls), tok_dir, tok.get("vocab_size", 512))
            print(f"data: tokenizer with {len(t)} tokens -> {tok_dir}")
    return manifests


def build_args(entry: dict[str, Any], out: Path, where: str) -> argparse.Namespace:
    """A ``data.builds`` entry as the arguments ``visor data build`` would parse (same defaults, same checks):
    ``{source: synthetic, image_size: 128}`` -> ``--source synthetic --image-size 128``."""
    from .cli import build_parser

    argv = ["data", "build", "--out", str(out), "--overwrite"]
    for key, value in entry.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    try:
        return build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed what is wrong
        raise ValueError(f"{where}: {entry} is not a valid `visor data build` (see the message above)") from None


def stage_args(stage: dict[str, Any], out: Path, experiment: str, done: dict[str, Path]) -> list[str]:
    """``visor fit`` arguments of a stage: its config, its run directory, and the hand-over from ``from``."""
    args = ["fit", "--config", stage["config"], "--trainer.default_root_dir", str(out / stage["name"]),
            "--experiment", experiment, "--run_name", stage["name"]]
    src = stage.get("from")
    if src is not None:
        name, _, kind = src.partition(":")
        if kind == "hf":  # a dense base exported as a LLaVA-OneVision directory: loaded as a user would
            args += ["--model.init_args.backbone.pretrained", str(done[name] / "hf")]
        else:
            args += ["--model.init_args.init_from", str(done[name] / "weights")]
    for k, v in (stage.get("args") or {}).items():
        args += [f"--{k}", str(v)]
    return args


def pipeline_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="visor pipeline", description=__doc__)
    p.add_argument("--config", required=True, help="pipeline YAML (experiments/debug/pipeline.yaml)")
    p.add_argument("--restart", action="store_true", help="rebuild data and rerun stages that already finished")
    p.add_argument("--only-data", action="store_true", help="build the data and stop")
    p.add_argument("--stage-args", default="", help="extra `visor fit` arguments for every stage, e.g. "
                   "\"--trainer.max_steps 20 --data.batches_per_epoch 20\" for a quick check")
    args = p.parse_args(argv)
    try:
        cfg = load_pipeline(args.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"visor pipeline: error: {e}")
        return 2
    return run_pipeline(cfg, restart=args.restart, only_data=args.only_data, extra=shlex.split(args.stage_args))


def run_pipeline(cfg: dict[str, Any], restart: bool = False, only_data: bool = False, extra: list[str] | None = None) -> int:
    import mlflow

    from .lit.cli import run_cli
    from .lit.metrics import metric_key

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    experiment = cfg.get("experiment", "visor-pipeline")
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    parent_file = out / "mlflow_parent_run_id"
    parent_id = parent_file.read_text().strip() if parent_file.is_file() and not restart else None
    t0 = time.perf_counter()
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else run_name(experiment, "pipeline")) as parent:
        parent_file.write_text(parent.info.run_id)
        sha, dirty = code_version()
        mlflow.set_tags({"stage": "pipeline", "git_commit": sha, "git_dirty": str(dirty).lower()})
        if cfg.get("data"):
            build_data(cfg["data"], restart)  # counts go to this parent run
        if only_data:
            return 0
        os.environ[PARENT_ENV] = parent.info.run_id
        done: dict[str, Path] = {}
        timings: dict[str, float] = {}
        try:
            for st in cfg["stages"]:
                root = out / st["name"]
                if not restart and (root / "weights" / "visor.json").is_file():
                    print(f"== stage {st['name']}: finished earlier ({root}/weights), kept")
                else:
                    if restart and root.exists():
                        shutil.rmtree(root)
                    argv = stage_args(st, out, experiment, done) + list(extra or [])
                    print(f"== stage {st['name']}: visor {shlex.join(argv)}")
                    t = time.perf_counter()
                    run_cli(argv)
                    timings[st["name"]] = round(time.perf_counter() - t, 1)
                done[st["name"]] = root
        finally:
            os.environ.pop(PARENT_ENV, None)
        peer = fastv_peer(cfg, out, done, list(extra or []), restart) if (cfg.get("summary") or {}).get("fastv") else None
        summary = summarize(cfg, out, done, peer)
        summary["seconds"] = {**timings, "total": round(time.perf_counter() - t0, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary["table"] + "\n")
        mlflow.log_artifact(str(out / "summary.md"))
        mlflow.log_artifact(str(out / "summary.json"))
        if summary.get("plot"):
            mlflow.log_artifact(summary["plot"], "plots")
        for row in summary["rows"]:
            for s, acc in row["acc"].items():
                mlflow.log_metric(f"summary/{s}/acc/{metric_key(row['config'].split(' ~ ')[0])}", acc)
    print(summary["table"])
    print(f"pipeline finished in {summary['seconds']['total']:.0f} s; browse it: visor ui --store {tracking_uri()}")
    return 0


def _results(done: dict[str, Path], name: str) -> dict[str, Any]:
    path = done[name] / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"stage {name} left no eval.json ({path}): did its validation run?")
    return json.loads(path.read_text())


def fastv_peer(cfg: dict[str, Any], out: Path, done: dict[str, Path], extra: list[str], restart: bool) -> dict[str, Any]:
    """FastV on the dense stage's weights at each VISOR fixed configuration's FLOPs (``summary.fastv``).

    Each drop ratio is solved with the FLOPs model so that FastV's mean prefill FLOPs over the evaluation sets
    (at their mean prompt token counts) equal the configuration's; then one ``visor eval`` scores them all on
    the same sets. Kept when ``<out>/fastv/eval.json`` already holds the same targets.
    """
    from .evaluate import run_eval
    from .flops import FlopsModel
    from .lit.module import _saved_spec
    from .models import LayerSchedule
    from .models.fastv import FastVConfig

    sm = cfg["summary"]
    layer = int(sm["fastv"].get("layer", 2))
    dense_name = sm.get("dense")
    if not dense_name:
        raise ValueError("summary.fastv needs summary.dense: FastV prunes the dense stage's model")
    stage = next(st for st in cfg["stages"] if st["name"] == dense_name)
    tokens = _results(done, dense_name).get("tokens") or {}
    first = (sm.get("visor") or [cfg["stages"][-1]["name"]])[0]
    visor = _results(done, first)["results"]
    sets = [s for s in visor if s in tokens]
    if not sets:
        raise ValueError(f"stage {dense_name}'s eval.json has no token counts for the sets of {first}: rerun it")
    weights = done[dense_name] / "weights"
    spec = _saved_spec(weights)
    fm = FlopsModel(spec, LayerSchedule.dense(spec.text.num_layers))
    work = [(tokens[s]["text"], tokens[s]["visual"]) for s in sets]
    matched: dict[str, list[str]] = {}  # FastV target -> the configurations it matches (equal-cost ones share it)
    for name in visor[sets[0]]:
        if name == "policy":
            continue
        target = 1e9 * sum(visor[s][name]["gflops"] for s in sets) / len(sets)
        matched.setdefault(FastVConfig(layer, fm.fastv_ratio_for(target, work, layer)).name, []).append(name)
    eval_dir = out / "fastv"
    prev = eval_dir / "eval.json"
    if not restart and prev.is_file() and set(json.loads(prev.read_text())["results"][sets[0]]) == set(matched):
        print(f"== FastV peer: evaluated earlier ({prev}), kept")
        doc = json.loads(prev.read_text())
    else:
        print(f"== FastV peer on {dense_name}: " + "; ".join(f"{k} ~ {', '.join(v)}" for k, v in matched.items()))
        stage_extra = [a for k, v in (stage.get("args") or {}).items() for a in (f"--{k}", str(v))]
        doc = run_eval([stage["config"]], str(weights), targets=",".join(matched), out=str(eval_dir),
                       extra=stage_extra + extra)
    return {"layer": layer, "matched": matched, "results": doc["results"]}


def summarize(cfg: dict[str, Any], out: Path, done: dict[str, Path], fastv: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table: dense (the ``summary.dense`` stage), every fixed configuration and each policy (the
    ``summary.visor`` stages), FastV at each fixed configuration's FLOPs when ``fastv`` is given, with accuracy
    per evaluation set and the prefill-FLOPs saving vs dense."""
    from visor_lightning.callbacks.mlflow_artifacts import plot_accuracy_vs_flops

    sm = cfg.get("summary") or {}
    dense_stage = sm.get("dense")
    visor_stages = sm.get("visor") or [cfg["stages"][-1]["name"]]

    def results(name: str) -> dict[str, Any]:
        return _results(done, name)["results"]

    rows: list[dict[str, Any]] = []
    dense_res: dict[str, dict[str, float]] = {}

    def row(label: str, sa: str, r: dict[str, Any], name: str) -> dict[str, Any]:
        """A table row for target ``name`` of eval results ``r``: accuracy, GFLOPs and saving per set."""
        sets = [s for s in r if name in r[s]]
        return {"config": label, "sa": sa, "acc": {s: r[s][name]["acc"] for s in sets},
                "gflops": {s: r[s][name]["gflops"] for s in sets},
                "saving": {s: dense_res[s]["gflops"] / r[s][name]["gflops"] if s in dense_res else r[s][name]["saving"]
                           for s in sets}}

    if dense_stage:
        r = results(dense_stage)
        for s, per in r.items():
            (only,) = per.values()
            dense_res[s] = only
        rows.append({"config": "dense", "sa": "all", "acc": {s: v["acc"] for s, v in dense_res.items()},
                     "gflops": {s: v["gflops"] for s, v in dense_res.items()}, "saving": {s: 1.0 for s in dense_res}})
    fixed_done = False
    for st in visor_stages:
        r = results(st)
        sets = list(r)
        for name in r[sets[0]]:
            if name == "policy":
                label = f"policy ({st})"
            elif fixed_done:
                continue
            else:
                label = name
            sa = "per sample" if name == "policy" else str(name.count(",") + 1 if name != "sa[]" else 0)
            rows.append({**row(label, sa, r, name), "choice": r[sets[0]][name].get("choice")})
        fixed_done = True
    for name, like in (fastv or {}).get("matched", {}).items():
        rows.append(row(f"{name} ~ {', '.join(like)}", "all, pruned", fastv["results"], name))
    sets = list(rows[0]["acc"]) if rows else []
    head = "| config | SA layers | " + " | ".join(f"{s} acc (%)" for s in sets) + " | prefill GFLOPs/sample | FLOPs saving vs dense |"
    lines = [head, "|" + "---|" * (4 + len(sets))]
    for row in rows:
        g = sum(row["gflops"].values()) / len(row["gflops"])
        sav = sum(row["saving"].values()) / len(row["saving"])
        accs = " | ".join(f"{100 * row['acc'][s]:.1f}" for s in sets)
        lines.append(f"| {row['config']} | {row['sa']} | {accs} | {g:.4f} | {sav:.2f}x |")
    plot = None
    if visor_stages:
        last = results(visor_stages[-1])
        merged = {s: dict(per) for s, per in last.items()}
        for st in visor_stages[:-1]:
            for s, per in results(st).items():
                if "policy" in per:
                    merged[s][f"policy ({st})"] = per["policy"]
        for name in (fastv or {}).get("matched", {}):
            for s, per in fastv["results"].items():
                if s in merged and name in per:
                    merged[s][name] = per[name]
        plot = str(plot_accuracy_vs_flops(merged, out / "plots" / "summary_acc_vs_flops.png", "VISOR", dense_res or None))
    return {"rows": rows, "table": "\n".join(lines), "plot": plot}
