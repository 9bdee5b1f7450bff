"""``visor eval``: accuracy and prefill FLOPs per evaluation set, for every fixed configuration and the policy.

It runs a stage config's ``data.val`` sets (one per benchmark or subset) through Lightning's ``validate`` with
the weights of ``--ckpt``: a stage's ``weights/`` directory, a ``.ckpt`` file or a DeepSpeed checkpoint
directory. It writes a Markdown table, a JSON document with per-sample records (prediction, reference,
correctness, configuration, FLOPs), and MLflow metrics. Those go into the run that trained the checkpoint when
one is found beside it (``mlflow_run_id``) or given (``--run-id``), else into a new ``eval`` run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from visor_lightning.errors import report
from visor_lightning.lit.tracking import RUN_ID_FILE, code_version


def training_run_id(ckpt: Path) -> str | None:
    """The MLflow run of the stage that wrote ``ckpt`` (its run directory holds ``mlflow_run_id``)."""
    for d in [ckpt, *ckpt.parents][:4]:
        f = d / RUN_ID_FILE
        if f.is_file():
            return f.read_text().strip()
    return None


def markdown(results: dict[str, dict[str, dict[str, Any]]], dense_gflops: dict[str, float],
             baselines: dict[str, dict[str, Any]] | None = None, untrained_router: bool = False,
             notes: list[str] | None = None) -> str:
    from visor_lightning.lit.module import is_routed

    lines = ["| set | target | samples | accuracy % | swapped images % | GFLOPs / sample (mean) | min - max | saving vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for s, targets in results.items():
        lines.append(f"| {s} | dense (analytic) | | | | {dense_gflops[s]:.3f} | | 1.00x |")
        for t, r in targets.items():
            swapped = f"{100 * r['acc_swapped']:.1f}" if "acc_swapped" in r else "-"
            name = f"{t} (untrained router)" if untrained_router and is_routed(t) else t
            lines.append(f"| {s} | {name} | {r['samples']} | {100 * r['acc']:.1f} | {swapped} | {r['gflops']:.3f} | "
                         f"{r['gflops_min']:.3f} - {r['gflops_max']:.3f} | {r['saving']:.2f}x |")
    for s, b in (baselines or {}).items():
        lines.append(f"\nQuestion-only baseline on {s}: {100 * b['acc']:.1f}% (majority answer per question, counted on "
                     f"{b['counted_on']}; uniform-answer chance {100 * b['chance']:.1f}%)")
        if b.get("warning"):
            lines.append(f"WARNING: question-only baseline on {s}: {b['warning']}")
    lines += [f"\nNote: {n}" for n in notes or []]
    return "\n".join(lines)


def split_names(text: str) -> list[str]:
    """``sa[0],sa[0,3],fastv(k=1,r=0.5)`` -> its names: commas inside brackets belong to the name."""
    return [t.strip() for t in re.split(r",(?![^\[(]*[\])])", text) if t.strip()]


def parse_knobs(text: str | None) -> list[float]:
    """``"0,0.02,0.1"`` -> [0.0, 0.02, 0.1]: the router's ``max_acc_drop`` values, one row each."""
    from visor_lightning.models.policy import check_knob

    if not text:
        return []
    try:
        return [check_knob(float(v)) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--max-acc-drop {text!r}: {e}") from None


def run_eval(config: list[str], ckpt: str, *, targets: str = "all", out: str | None = None, run_id: str | None = None,
             extra: list[str] | None = None, swap: bool = True,
             baseline_train: dict[str, str] | str | None = None, max_acc_drop: list[float] | None = None,
             mlflow: bool = True, sets: str = "val") -> dict[str, Any]:
    """Score every target on every ``data.val`` set (``sets="test"``: every ``data.test`` set); with ``swap`` also on
    each set's swapped-image copy (``acc_swapped``), and the question-only baseline per set (``baseline_train``: a
    training split for all sets, or one per set name; by default the config's ``data.train``, and only without one
    the set itself, with a warning). ``max_acc_drop``: the router at each of these
    knob values, one target each (``policy(max_acc_drop=X)``; needs a correctness-trained policy). A router no policy
    stage has trained is not scored as a policy (a note says so; named, its rows are labelled untrained)."""
    from visor_lightning.data.datamodule import SWAPPED
    from visor_lightning.lit.cli import VisorCLI
    from visor_lightning.lit.module import POLICY, is_routed
    from visor_lightning.models.policy import knob_target

    ckpt_path = Path(ckpt)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file or directory")
    out_dir = Path(out) if out else ckpt_path.parent / ("eval" if sets == "val" else "eval_test")
    args: list[str] = []
    for c in config:
        args += ["--config", c]
    args += ["--model.init_args.init_from", str(ckpt_path), "--trainer.default_root_dir", str(out_dir),
             "--mlflow", "false", *(extra or [])]
    from visor_lightning.commands.pipeline import launches_processes

    if launches_processes(args):  # Lightning would start the other ranks by re-running this command (a whole
        # pipeline, from `visor pipeline --stage-args "--trainer.devices 2"`); the records are per process anyway
        print("[visor eval] evaluates in one process: --trainer.devices 1 --trainer.num_nodes 1 (the multi-process "
              "setting is for training)")
        args += ["--trainer.devices", "1", "--trainer.num_nodes", "1"]
    cli = VisorCLI(args=args, run=False)
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.use_split(sets)
    names = module.schedule.names
    wanted = list(names) if targets == "all" else split_names(targets)
    routed = module.schedule.router_layer is not None  # a dense model has nothing to route
    untrained = routed and not module.model.policy.trained  # e.g. universal weights: the router is its random init
    notes = []
    if untrained:
        if targets == "all":
            notes.append(f"{POLICY}: not scored: no policy stage has trained this model's router "
                         f"(name it in --configs to score it anyway, labelled untrained)")
        elif any(is_routed(t) for t in wanted) or max_acc_drop:
            notes.append(f"{POLICY}: this model's router is untrained (no policy stage has trained it): its rows show "
                         "what a random router picks")
    if targets == "all" and routed and not untrained:
        wanted.append(POLICY)
    wanted += [knob_target(v) for v in max_acc_drop or [] if knob_target(v) not in wanted]
    module.hparams.eval_configs = wanted
    module.eval_targets()  # unknown names fail here, before any data is read
    module.sample_records = []
    if isinstance(baseline_train, dict):
        unknown = set(baseline_train) - set(dm.eval_spec)
        if unknown:
            raise ValueError(f"--baseline-train names {sorted(unknown)}, not evaluation sets {list(dm.eval_spec)}")
    dm.swap_images = swap
    module.score_loss = False  # eval.json reports answers, not the teacher-forced loss: one forward pass less
    trainer.validate(module, datamodule=dm, verbose=False)  # eval.md is the table

    records = module.sample_records
    for r in records:
        r["swapped"] = r["set"].endswith(SWAPPED)
        r["set"] = r["set"].removesuffix(SWAPPED)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    dense: dict[str, float] = {}
    for s, targets_ in module.eval_results.items():
        if s.endswith(SWAPPED):
            continue
        results[s] = {}
        rows = [r for r in records if r["set"] == s and not r["swapped"]]
        dense[s] = sum(r["dense_gflops"] for r in rows) / max(1, len(rows))
        for t, r in targets_.items():
            per = [x["gflops"] for x in rows if x["target"] == t]
            results[s][t] = {**r, "samples": len(per), "gflops_min": min(per, default=0.0),
                             "gflops_max": max(per, default=0.0)}
            if swap:
                results[s][t]["acc_swapped"] = module.eval_results[s + SWAPPED][t]["acc"]
    if dm.train_spec:  # by default the split the model learnt from, not the set scored
        learnt = list(dm.train_spec) if isinstance(dm.train_spec, (list, tuple)) else dm.train_spec
        if baseline_train is None:
            baseline_train = learnt
        elif isinstance(baseline_train, dict):
            baseline_train = {s: baseline_train.get(s, learnt) for s in results}
    refs: dict[str, list[tuple[str, str]]] = {}
    baselines = {s: baseline_for(s, records, baseline_train, refs) for s in results}
    tokens = {s: v for s, v in module.eval_tokens.items() if not s.endswith(SWAPPED)}
    doc = {"config": config, "ckpt": str(ckpt_path), "sets": sets, "schedule": module.schedule.describe(), "results": results,
           "baselines": baselines, "dense_gflops": dense, "tokens": tokens, "policy_trained": not untrained,
           "notes": notes, "samples": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(doc, indent=2))
    table = markdown(results, dense, baselines, untrained_router=untrained, notes=notes)
    (out_dir / "eval.md").write_text(table + "\n")
    doc["table"], doc["out"] = table, str(out_dir)
    stage = _checkpoint_stage(ckpt_path) or module.stage
    tags = {"stage": "eval", "eval.stage": stage, "eval.config": ", ".join(str(Path(c).resolve()) for c in config),
            "eval.ckpt": str(ckpt_path.resolve()), "eval.sets": sets, "git_commit": code_version()[0]}
    doc["mlflow_run_id"] = (log_to_mlflow(results, out_dir, run_id, training_run_id(ckpt_path), baselines,
                                          prefix="eval" if sets == "val" else "eval_test",
                                          name=stage if sets == "val" else f"{stage}-test", tags=tags) if mlflow else None)
    return doc


UNSEEN_WARN = 0.5  # warn when more than this share of the evaluated questions never occur in the baseline's split


def _checkpoint_stage(ckpt: Path) -> str | None:
    """The stage that wrote a weights/ directory (its visor.json), or None (a .ckpt: the config's stage is used)."""
    from visor_lightning.lit.weights import CONFIG_FILE, read_config

    return read_config(ckpt).get("stage") if (ckpt / CONFIG_FILE).is_file() else None


def baseline_for(name: str, records: list[dict[str, Any]], train: dict[str, str] | list[str] | str | None,
                 cache: dict[str, list[tuple[str, str]]] | None = None) -> dict[str, Any]:
    """The question-only baseline of evaluation set ``name`` (its real-image records, one per sample), counted on
    ``train`` (one split for every set, or one per set name; ``cache`` keeps a split read once per evaluation).
    Its ``warning`` says when the number cannot be read as a baseline: counted on the evaluated set itself
    (optimistic), or most evaluated questions never seen in the split (they all get its overall majority answer)."""
    from visor_lightning.controls import question_only_baseline, read_qa

    first = next((r["target"] for r in records if r["set"] == name), None)
    evaluated = [(r["question"], r["answer"]) for r in records if r["set"] == name and not r["swapped"] and r["target"] == first]
    spec = train.get(name) if isinstance(train, dict) else train
    if spec is None:
        res = question_only_baseline(evaluated)
        res["warning"] = ("counted on the evaluated set itself, so optimistic (it has seen the answers it is scored "
                          "on): the config names no data.train; pass --baseline-train with the training split")
        return res
    label = ", ".join(spec) if isinstance(spec, (list, tuple)) else str(spec)
    cache = {} if cache is None else cache
    if label not in cache:
        cache[label] = list(read_qa(spec))
    res = question_only_baseline(evaluated, cache[label], reference_name=label)
    if res["unseen_questions"] > UNSEEN_WARN * res["samples"]:
        res["warning"] = (f"{res['unseen_questions']} of {res['samples']} evaluated questions never occur in {label}, "
                          "so they all get its overall majority answer: is it the split these questions come from? "
                          "(--baseline-train SET=SHARDS)")
    return res


def log_to_mlflow(results: dict[str, dict[str, dict[str, Any]]], out_dir: Path, run_id: str | None,
                  found: str | None, baselines: dict[str, dict[str, Any]] | None = None, prefix: str = "eval",
                  name: str = "eval", tags: dict[str, str] | None = None) -> str:
    """Into ``run_id`` (must exist), else the training run ``found`` beside the checkpoint if this store has it,
    else a new run in experiment ``visor-eval``, named ``visor-eval-<name>-<commit>`` (``name``: the checkpoint's
    stage) and tagged with ``tags`` (config and checkpoint paths). Metrics are ``{prefix}/<set>/...`` (``eval_test``
    for held-out sets)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from visor_lightning.lit.metrics import metric_key
    from visor_lightning.lit.tracking import ensure_experiment, run_name, tracking_uri

    uri = tracking_uri()
    client = MlflowClient(uri)

    def exists(rid: str) -> bool:
        try:
            client.get_run(rid)
            return True
        except MlflowException:
            return False

    if run_id is not None and not exists(run_id):
        raise ValueError(f"--run-id {run_id}: no such run in {uri} (set MLFLOW_TRACKING_URI to the store that has it)")
    if run_id is None and found is not None:
        if exists(found):
            run_id = found
        else:
            print(f"[visor eval] the checkpoint's training run {found} is not in {uri}; logging to a new run")
    if run_id is None:
        run_id = client.create_run(ensure_experiment(client, "visor-eval"), run_name=run_name("visor-eval", name),
                                   tags=tags or {}).info.run_id
        client.set_terminated(run_id)
    for s, targets in results.items():
        for t, r in targets.items():
            k = metric_key(t)
            client.log_metric(run_id, f"{prefix}/{s}/acc/{k}", r["acc"])
            client.log_metric(run_id, f"{prefix}/{s}/gflops/{k}", r["gflops"])
            client.log_metric(run_id, f"{prefix}/{s}/flops_saving/{k}", r["saving"])
            if "acc_swapped" in r:
                client.log_metric(run_id, f"{prefix}/{s}/acc_swapped/{k}", r["acc_swapped"])
    for s, b in (baselines or {}).items():
        client.log_metric(run_id, f"{prefix}/{s}/question_only_acc", b["acc"])
        client.log_metric(run_id, f"{prefix}/{s}/answer_chance", b["chance"])
    client.log_artifact(run_id, str(out_dir / "eval.json"), prefix)
    client.log_artifact(run_id, str(out_dir / "eval.md"), prefix)
    return run_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visor eval", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after `--` go to the stage config, e.g. -- --data.eval_batch_size 8")
    p.add_argument("--config", action="append", required=True, help="stage YAML whose data.val (or data.test) sets are evaluated")
    p.add_argument("--sets", choices=["val", "test"], default="val",
                   help="val: the config's data.val development sets (default); test: its held-out data.test sets")
    p.add_argument("--ckpt", required=True, help="weights/ directory, .ckpt file or DeepSpeed checkpoint directory")
    p.add_argument("--configs", default="all", help="'all' (every feasible configuration + policy) or names, comma-separated; "
                   "on a dense model also the FastV peer, fastv(k=K,r=R)")
    p.add_argument("--max-acc-drop", default=None, metavar="X[,X...]",
                   help="a router trained with objective correctness, at each knob value (one row each): the cheapest "
                   "configuration whose predicted accuracy is at most X below the maximal one's (0 = strictest, 1 = "
                   "always the cheapest), e.g. 0,0.02,0.05,0.1")
    p.add_argument("--out", default=None, help="where eval.json / eval.md go (default: <ckpt dir>/eval, or eval_test "
                   "with --sets test)")
    p.add_argument("--run-id", default=None, help="MLflow run to log into (default: the run that wrote --ckpt)")
    p.add_argument("--mlflow", choices=["true", "false"], default="true",
                   help="false: write eval.json / eval.md only, log nothing to MLflow (default true)")
    p.add_argument("--no-swap", action="store_true", help="skip the swapped-image control (each set is read once)")
    p.add_argument("--baseline-train", action="append", default=[], metavar="[SET=]SHARDS",
                   help="training split for the question-only baseline (manifest, glob), for every set or for SET; "
                   "default: the config's data.train (the evaluated set itself, with a warning, if it has none)")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    return p


def parse_baseline_train(values: list[str]) -> dict[str, str] | str | None:
    """``["x-manifest.json"]`` -> one split for every set; ``["easy=a", "hard=b"]`` -> per set."""
    if not values:
        return None
    named = [v for v in values if "=" in v]
    if not named and len(values) == 1:
        return values[0]
    if len(named) != len(values):
        raise ValueError(f"--baseline-train: give one split for every set, or SET=SHARDS for each; got {values}")
    return dict(v.split("=", 1) for v in values)


def eval_main(argv: list[str]) -> int:
    from visor_lightning.commands.args import split_passthrough

    argv, extra = split_passthrough(argv)
    a = build_parser().parse_args(argv)
    from visor_lightning.commands.json_out import emit, stdout_for_json

    with stdout_for_json(a.json) as out:
        try:
            doc = run_eval(a.config, a.ckpt, targets=a.configs, out=a.out, run_id=a.run_id, extra=extra,
                           swap=not a.no_swap, baseline_train=parse_baseline_train(a.baseline_train),
                           max_acc_drop=parse_knobs(a.max_acc_drop), mlflow=a.mlflow == "true", sets=a.sets)
        except (FileNotFoundError, ValueError) as e:
            return report("eval", e)
        if a.json:
            emit({k: v for k, v in doc.items() if k != "table"}, out)
            return 0
    print(doc["table"])
    logged = f"MLflow run {doc['mlflow_run_id']}" if doc["mlflow_run_id"] else "nothing logged to MLflow (--mlflow false)"
    print(f"\nper-sample records: {doc['out']}/eval.json; {logged}")
    return 0
