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
import sys
import time
from pathlib import Path
from typing import Any

from visor_lightning.config_check import key_problems, raise_problems, stage_problems
from visor_lightning.errors import report
from visor_lightning.lit.tracking import METRICS_ENV, PARENT_ENV, code_version, ensure_experiment, run_name, tracking_uri
from visor_lightning.models.policy import check_knob, knob_target

STAGE_KEYS = {"name", "config", "from", "args", "fit_args"}
SUMMARY_KEYS = {"dense", "dense_long", "visor", "fastv", "eval", "max_acc_drop"}
PIPELINE_SCHEMA = {  # the keys a pipeline YAML may hold (visor_lightning.config_check; None: not checked below)
    "out": None, "experiment": None, "data": {"dir": None, "builds": None, "tokenizer": None},
    "stages": {"*": dict.fromkeys(STAGE_KEYS)},
    "summary": {**dict.fromkeys(SUMMARY_KEYS), "dense_long": {"stage": None, "as_long_as": None},
                "eval": {"sets": None, "baseline_train": None}, "fastv": None},
}


def load_pipeline(path: str | Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config {str(path)!r} does not exist")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    problems = key_problems(path, PIPELINE_SCHEMA)
    for i, st in enumerate(cfg.get("stages") or []):  # each stage's config and args, all reported at once
        if isinstance(st, dict) and Path(str(st.get("config"))).is_file():
            problems += stage_problems(["--config", st["config"], *own_args(st), *own_args(st, "fit_args")],
                                       where=f"{path}: stages[{i}] ({st.get('name')}) args")
    raise_problems(problems)
    for key in ("out", "stages"):
        if key not in cfg:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    every = [st.get("name") for st in cfg["stages"]]  # all stage names (the loop below checks order)
    sm = cfg.get("summary") or {}
    long = sm.get("dense_long")
    if long is not None:
        if set(long) != {"stage", "as_long_as"} or long["stage"] not in every or not set(long["as_long_as"]) <= set(every):
            raise ValueError(f"{path}: summary.dense_long needs stage (a stage name) and as_long_as (stage names whose "
                             f"optimizer steps it matches); stages are {every}")
        if every.index(long["stage"]) < max(every.index(n) for n in long["as_long_as"]):
            raise ValueError(f"{path}: stage {long['stage']!r} must come after {long['as_long_as']} (its steps are their sum)")
    try:
        [check_knob(v) for v in sm.get("max_acc_drop") or []]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: summary.max_acc_drop must be a list of knob values in [0, 1]: {e}") from None
    names = []
    for i, st in enumerate(cfg["stages"]):
        bad = set(st) - STAGE_KEYS
        if bad or "name" not in st or "config" not in st:
            raise ValueError(f"{path}: stages[{i}] needs name and config (optional: from, args, fit_args); unknown {sorted(bad)}")
        if not Path(st["config"]).is_file():
            raise FileNotFoundError(f"{path}: stages[{i}].config {st['config']!r} does not exist")
        src = st.get("from")
        if src is not None and src.split(":")[0] not in names:
            raise ValueError(f"{path}: stages[{i}].from {src!r} names no earlier stage (have {names})")
        names.append(st["name"])
    return cfg


def build_data(spec: dict[str, Any], restart: bool) -> dict[str, Any]:
    """Every ``data.builds`` entry (skipped when its manifest has the same arguments) and the tokenizer."""
    from visor_lightning.data.build import builder_args, run_build
    from visor_lightning.data.report import log_counts_to_mlflow, manifest_counts
    from visor_lightning.data.shards import manifest_path, read_manifest, split_urls
    from visor_lightning.data.tokenizer import conversation_texts, train_tokenizer

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
    from visor_lightning.commands.args import add_data_build_args

    parser = argparse.ArgumentParser(prog="visor data build", exit_on_error=True)
    add_data_build_args(parser)
    argv = ["--out", str(out), "--overwrite"]
    for key, value in entry.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    try:
        return parser.parse_args(argv)
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
    return args + own_args(stage) + own_args(stage, "fit_args")


def launches_processes(argv: list[str]) -> bool:
    """Whether ``visor fit argv`` starts more than one process (``--trainer.devices N`` with N > 1, or several nodes;
    the last occurrence of a flag wins, as in the parser). Lightning starts the other ranks by running the current
    command again, so such a stage runs as its own ``visor fit`` process: in-process, they would re-run the pipeline."""
    value = {"--trainer.devices": "1", "--trainer.num_nodes": "1"}
    for i, arg in enumerate(argv):
        flag, eq, v = arg.partition("=")
        if flag in value:
            value[flag] = v if eq else (argv[i + 1] if i + 1 < len(argv) else "1")
    return any(v not in ("1", "auto") for v in value.values())


def run_fit_process(argv: list[str], root: Path) -> dict[str, Any]:
    """``visor fit argv`` as a child process (its output streams through); its final metrics, for the stage line."""
    import subprocess

    metrics_file = root / "final_metrics.json"
    env = {**os.environ, METRICS_ENV: str(metrics_file)}
    code = subprocess.run([sys.executable, "-m", "visor_lightning", *argv], env=env).returncode
    if code:
        raise RuntimeError(f"stage {root.name}: `visor {shlex.join(argv)}` exited with {code} (its output is above)")
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def stage_line(name: str, seconds: float, metrics: dict[str, Any]) -> str:
    """One line per finished stage: name, time, final training loss and the validation accuracies."""
    parts = [f"== stage {name}: done in {seconds:.0f} s"]
    if "train/loss" in metrics:
        parts.append(f"train loss {float(metrics['train/loss']):.3f}")
    accs = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/") and "/acc/" in k}
    if accs:
        parts.append("val acc " + ", ".join(f"{k.replace('/acc/', ' ')} {100 * v:.1f}%" for k, v in sorted(accs.items())))
    return "; ".join(parts)


def own_args(stage: dict[str, Any], key: str = "args") -> list[str]:
    """A stage's ``args`` as ``visor fit`` flags: ``{trainer.max_steps: 5}`` -> ``--trainer.max_steps 5``.

    ``args`` apply wherever the stage's config is used (its training and its evaluation); ``fit_args`` to its
    training only: how it runs (e.g. DDP over 2 processes), not what the model is."""
    return [a for k, v in (stage.get(key) or {}).items() for a in (f"--{k}", str(v))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visor pipeline", description=__doc__)
    p.add_argument("--config", required=True, help="pipeline YAML (experiments/debug/pipeline.yaml)")
    p.add_argument("--restart", action="store_true", help="rebuild data and rerun stages that already finished")
    p.add_argument("--only-data", action="store_true", help="build the data and stop")
    p.add_argument("--stage-args", default="", help="extra `visor fit` arguments for every stage, e.g. "
                   "\"--trainer.max_steps 20 --data.batches_per_epoch 20\" for a quick check")
    return p


def pipeline_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_pipeline(args.config)
        raise_problems(stage_problems(shlex.split(args.stage_args), where="--stage-args"))
    except (ValueError, FileNotFoundError) as e:
        return report("pipeline", e)
    return run_pipeline(cfg, restart=args.restart, only_data=args.only_data, extra=shlex.split(args.stage_args))


def run_pipeline(cfg: dict[str, Any], restart: bool = False, only_data: bool = False, extra: list[str] | None = None) -> int:
    import mlflow

    from visor_lightning.lit.cli import run_cli
    from visor_lightning.lit.metrics import metric_key

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    experiment = cfg.get("experiment", "visor-pipeline")
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(), experiment))
    parent_file = out / "mlflow_parent_run_id"
    parent_id = parent_file.read_text().strip() if parent_file.is_file() and not restart else None
    t0 = time.perf_counter()
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else run_name(experiment, "pipeline")) as parent:
        parent_file.write_text(parent.info.run_id)
        sha, dirty = code_version()
        mlflow.set_tags({"stage": "pipeline", "git_commit": sha, "git_dirty": str(dirty).lower()})
        timings: dict[str, float] = {}
        if cfg.get("data"):
            build_data(cfg["data"], restart)  # counts go to this parent run
            timings["data"] = round(time.perf_counter() - t0, 1)
        if only_data:
            return 0
        os.environ[PARENT_ENV] = parent.info.run_id
        done: dict[str, Path] = {}
        try:
            for st in cfg["stages"]:
                root = out / st["name"]
                if not restart and (root / "weights" / "visor.json").is_file():
                    print(f"== stage {st['name']}: finished earlier ({root}/weights), kept")
                else:
                    if restart and root.exists():
                        shutil.rmtree(root)
                    argv = stage_args(st, out, experiment, done) + list(extra or []) + match_steps(cfg, st, done)
                    print(f"== stage {st['name']}: visor {shlex.join(argv)}")
                    t = time.perf_counter()
                    if launches_processes(argv):
                        metrics = run_fit_process(argv, root)
                    else:
                        metrics = run_cli(argv).trainer.callback_metrics
                    timings[st["name"]] = round(time.perf_counter() - t, 1)
                    print(stage_line(st["name"], timings[st["name"]], metrics), flush=True)
                done[st["name"]] = root
        finally:
            os.environ.pop(PARENT_ENV, None)
        t = time.perf_counter()
        docs = evaluate_targets(cfg, out, done, list(extra or []), restart)
        timings["evaluation"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        peer = fastv_peer(cfg, out, done, docs, list(extra or []), restart) if (cfg.get("summary") or {}).get("fastv") else None
        if peer:
            timings["fastv"] = round(time.perf_counter() - t, 1)
        timings["total"] = round(time.perf_counter() - t0, 1)
        summary = summarize(cfg, out, done, docs, peer, timings)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary["table"] + "\n")
        mlflow.log_artifact(str(out / "summary.md"))
        mlflow.log_artifact(str(out / "summary.json"))
        if summary.get("plot"):
            mlflow.log_artifact(summary["plot"], "plots")
        for row in summary["rows"]:
            key = metric_key(row["config"].split(" ~ ")[0])
            for s, acc in row["acc"].items():
                mlflow.log_metric(f"summary/{s}/acc/{key}", acc)
                if row["acc_swapped"].get(s) is not None:
                    mlflow.log_metric(f"summary/{s}/acc_swapped/{key}", row["acc_swapped"][s])
        for s, b in summary["baselines"].items():
            mlflow.log_metric(f"summary/{s}/question_only_acc", b["acc"])
        for name, f in summary["findings"].items():
            if f["holds"] is not None:
                mlflow.log_metric(f"summary/findings/{name}", float(f["holds"]))
    print(summary["table"])
    print(f"pipeline finished in {summary['seconds']['total']:.0f} s; browse it: visor ui --store {tracking_uri()}")
    return 0


def match_steps(cfg: dict[str, Any], stage: dict[str, Any], done: dict[str, Path]) -> list[str]:
    """``summary.dense_long``: that stage trains as many optimizer steps as the stages it is matched to did
    (read from their ``weights/visor.json``), so extra training cannot explain VISOR's rows."""
    long = (cfg.get("summary") or {}).get("dense_long")
    if not long or stage["name"] != long["stage"]:
        return []
    steps = sum(int(json.loads((done[n] / "weights" / "visor.json").read_text())["global_step"]) for n in long["as_long_as"])
    print(f"== stage {stage['name']}: {steps} optimizer steps, as many as {' + '.join(long['as_long_as'])}")
    from omegaconf import OmegaConf

    own = OmegaConf.load(stage["config"])  # one epoch of exactly these steps, so the stage validates at its end
    accum = max(1, int(own.get("global_batch_size") or 1) // int(own.get("data", {}).get("batch_size") or 1))
    return ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "1", "--data.batches_per_epoch", str(steps * accum)]


def eval_sets_args(cfg: dict[str, Any]) -> list[str]:
    """``summary.eval.sets`` replaces each stage's ``data.val`` (its development split) for the summary."""
    sets = ((cfg.get("summary") or {}).get("eval") or {}).get("sets")
    return ["--data.val", json.dumps(sets)] if sets else []


def stage_extra(cfg: dict[str, Any], name: str) -> list[str]:
    return own_args(next(st for st in cfg["stages"] if st["name"] == name))


def stage_config(cfg: dict[str, Any], name: str) -> str:
    return next(st for st in cfg["stages"] if st["name"] == name)["config"]


def evaluate_targets(cfg: dict[str, Any], out: Path, done: dict[str, Path], extra: list[str], restart: bool) -> dict[str, dict]:
    """``visor eval`` (swapped-image control and question-only baselines included) of every summary stage on
    the evaluation sets: the dense rows' model, every fixed configuration and policy of the first VISOR stage
    (with ``summary.max_acc_drop``: its router at each knob value), the policy of the others. Kept when
    ``<out>/eval/<stage>/eval.json`` exists with the same targets (a resumed pipeline)."""
    from visor_lightning.commands.evaluate import run_eval

    sm = cfg.get("summary") or {}
    visor = sm.get("visor") or [cfg["stages"][-1]["name"]]
    plan = [(n, "all") for n in (sm.get("dense"), (sm.get("dense_long") or {}).get("stage")) if n]
    plan += [(n, "all" if i == 0 else "policy") for i, n in enumerate(visor)]
    baseline = (sm.get("eval") or {}).get("baseline_train")
    knobs = list(sm.get("max_acc_drop") or [])
    docs = {}
    for name, targets in plan:
        where = out / "eval" / name
        sweep = knobs if name == visor[0] else []
        if not restart and (where / "eval.json").is_file():
            prev = json.loads((where / "eval.json").read_text())
            if all(knob_target(v) in next(iter(prev["results"].values())) for v in sweep):
                print(f"== eval {name}: done earlier ({where}/eval.json), kept")
                docs[name] = prev
                continue
        print(f"== eval {name} ({targets}{', max_acc_drop ' + ','.join(f'{v:g}' for v in sweep) if sweep else ''}) "
              "on the evaluation sets, real and swapped images")
        docs[name] = run_eval([stage_config(cfg, name)], str(done[name] / "weights"), targets=targets, out=str(where),
                              extra=stage_extra(cfg, name) + extra + eval_sets_args(cfg), baseline_train=baseline,
                              max_acc_drop=sweep)
    return docs


def fastv_peer(cfg: dict[str, Any], out: Path, done: dict[str, Path], docs: dict[str, dict], extra: list[str],
               restart: bool) -> dict[str, Any]:
    """FastV on the dense model (``dense_long`` when there is one: as long-trained as VISOR) at each VISOR fixed
    configuration's FLOPs (``summary.fastv``).

    Each drop ratio is solved with the FLOPs model so that FastV's mean prefill FLOPs over the evaluation sets
    (at their mean prompt token counts) equal the configuration's; then one ``visor eval`` scores them all on
    the same sets. Kept when ``<out>/fastv/eval.json`` already holds the same targets.
    """
    from visor_lightning.commands.evaluate import run_eval
    from visor_lightning.flops import FlopsModel
    from visor_lightning.lit.module import _saved_spec, is_routed
    from visor_lightning.models import LayerSchedule
    from visor_lightning.models.fastv import FastVConfig

    sm = cfg["summary"]
    layer = int(sm["fastv"].get("layer", 2))
    dense_name = (sm.get("dense_long") or {}).get("stage") or sm.get("dense")
    if not dense_name:
        raise ValueError("summary.fastv needs summary.dense: FastV prunes the dense stage's model")
    tokens = docs[dense_name].get("tokens") or {}
    first = (sm.get("visor") or [cfg["stages"][-1]["name"]])[0]
    visor = docs[first]["results"]
    sets = [s for s in visor if s in tokens]
    if not sets:
        raise ValueError(f"the evaluation of {dense_name} has no token counts for the sets of {first}: rerun it")
    weights = done[dense_name] / "weights"
    spec = _saved_spec(weights)
    fm = FlopsModel(spec, LayerSchedule.dense(spec.text.num_layers))
    work = [(tokens[s]["text"], tokens[s]["visual"]) for s in sets]
    matched: dict[str, list[str]] = {}  # FastV target -> the configurations it matches (equal-cost ones share it)
    unreachable: dict[str, float] = {}  # configurations cheaper than FastV dropping every visual token at `layer`
    floor = fm.fastv_mean_prefill(work, layer, 1.0)
    for name in visor[sets[0]]:
        if is_routed(name):
            continue
        target = 1e9 * sum(visor[s][name]["gflops"] for s in sets) / len(sets)
        if target < 0.95 * floor:  # e.g. CA-only: no drop ratio gets FastV this cheap (its first layers see every token)
            unreachable[name] = round(floor / target, 3)
            continue
        matched.setdefault(FastVConfig(layer, fm.fastv_ratio_for(target, work, layer)).name, []).append(name)
    if unreachable:
        print(f"== FastV peer: at layer {layer} it cannot get as cheap as {sorted(unreachable)} "
              f"(dropping every visual token still costs {', '.join(f'{v:.2f}x' for v in unreachable.values())} theirs)")
    eval_dir = out / "fastv"
    prev = eval_dir / "eval.json"
    if not restart and prev.is_file() and set(json.loads(prev.read_text())["results"][sets[0]]) == set(matched):
        print(f"== FastV peer: evaluated earlier ({prev}), kept")
        doc = json.loads(prev.read_text())
    else:
        print(f"== FastV peer on {dense_name}: " + "; ".join(f"{k} ~ {', '.join(v)}" for k, v in matched.items()))
        doc = run_eval([stage_config(cfg, dense_name)], str(weights), targets=",".join(matched), out=str(eval_dir),
                       extra=stage_extra(cfg, dense_name) + extra + eval_sets_args(cfg),
                       baseline_train=(sm.get("eval") or {}).get("baseline_train"))
    return {"layer": layer, "on": dense_name, "matched": matched, "unreachable": unreachable, "doc": doc}


def _stage_hparams(done: dict[str, Path], name: str) -> dict[str, Any]:
    """The resolved ``model.init_args`` a stage ran with (its run directory's config.yaml)."""
    from omegaconf import OmegaConf

    path = done[name] / "config.yaml"
    if not path.is_file():
        return {}
    return dict(OmegaConf.to_container(OmegaConf.load(path)).get("model", {}).get("init_args", {}) or {})


def summarize(cfg: dict[str, Any], out: Path, done: dict[str, Path], docs: dict[str, dict],
              fastv: dict[str, Any] | None = None, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """One row per target on the evaluation sets: ``dense`` (the base), ``dense_long`` (the base trained as long
    as the VISOR chain), every fixed configuration and each policy (``summary.visor`` stages), FastV at each
    fixed configuration's FLOPs; the question-only baselines; the findings (``summary.findings``)."""
    from visor_lightning.commands import summary as S

    sm = cfg.get("summary") or {}
    visor = sm.get("visor") or [cfg["stages"][-1]["name"]]
    dense_name, long_name = sm.get("dense"), (sm.get("dense_long") or {}).get("stage")
    ref = docs[dense_name or visor[0]]
    dense_gflops = ref["dense_gflops"]
    rows: list[dict[str, Any]] = []
    for label, name in (("dense", dense_name), ("dense_long", long_name)):
        if name:
            (only,) = docs[name]["results"][next(iter(docs[name]["results"]))]
            rows.append(S.target_row(label, "dense", docs[name], only, dense_gflops))
    first = docs[visor[0]]
    for t in first["results"][next(iter(first["results"]))]:
        if t.startswith("sa["):
            rows.append(S.target_row(t, "fixed", first, t, dense_gflops))
        elif t == "dense" and visor[0] not in (dense_name, long_name):  # a dense stage listed as `visor`: its one row
            rows.append(S.target_row(visor[0], "dense", first, t, dense_gflops))
    for v in sm.get("max_acc_drop") or []:
        row = S.target_row(f"{visor[0]} (max_acc_drop={v:g})", "sweep", first, knob_target(v), dense_gflops)
        row["knob"] = float(v)
        rows.append(row)
    for name in visor:
        doc = docs[name]
        hp = _stage_hparams(done, name)
        if hp.get("objective") == "correctness" and sm.get("max_acc_drop"):
            continue  # the router is in the table as its sweep
        if any("policy" in per for per in doc["results"].values()):
            row = S.target_row(f"policy ({name})", "policy", doc, "policy", dense_gflops)
            row["objective"] = hp.get("objective", "pseudo_label")
            if row["objective"] == "budget":
                row["target_savings"] = hp.get("target_savings")
            rows.append(row)
    for name, like in (fastv or {}).get("matched", {}).items():
        row = S.target_row(f"{name} ~ {', '.join(like)}", "fastv", fastv["doc"], name, dense_gflops)
        row["matches"] = like
        rows.append(row)
    baselines = ref["baselines"]
    budget = next((r.get("target_savings") for r in rows if r.get("objective") == "budget"), None)
    sets = list(baselines)
    fams = ("easy", "hard") if {"easy", "hard"} <= set(sets) else (sets + sets)[:2]
    found = S.findings(rows, baselines, dense_gflops, budget, *fams)
    search = _search_of(done, cfg)
    text = S.table(rows, baselines, found, dense_gflops, seconds)
    if search:
        text += "\n\nfeasible-set search (universal stage, development split): candidate answer-token accuracy " + \
            ", ".join(f"{k} {100 * v:.1f}" for k, v in search["candidates"].items()) + \
            f"; kept {['sa[' + ','.join(map(str, c)) + ']' for c in search['feasible']]} (tolerance {search['tolerance']})"
    check = S.routed_agreement(first, knob_target(0)) if 0 in (sm.get("max_acc_drop") or []) else None
    if check is not None:
        text += (f"\n\nrouter check: `policy` (routed generation) and `{knob_target(0)}` (each sample's configuration's "
                 f"answer) agree on {check['same_config']} of {check['samples']} configurations and "
                 f"{check['same_answer']} of {check['samples']} answers")
    plot = str(S.plot(rows, out / "plots" / "summary_acc_vs_flops.png"))
    return {"rows": rows, "baselines": baselines, "findings": found, "search": search, "seconds": seconds or {},
            "table": text, "plot": plot, "router_check": check}


def _search_of(done: dict[str, Path], cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The universal stage's feasible-set search (candidate scores and what it kept), if one ran."""
    for st in cfg["stages"]:
        path = done.get(st["name"], Path("/nonexistent")) / "feasible.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None
