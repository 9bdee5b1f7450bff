"""``visor realsize``: the real recipe (experiments/llava_ov_0.5b/pipeline.yaml) at real shapes on this machine.

Every stage of the pipeline trains 2 optimizer steps of the 0.9B-parameter LLaVA-OneVision 0.5B + VISOR model in
``bf16-mixed``, from a random-weight checkpoint directory laid out like the released one, on shards built from a
parquet split in LLaVA-OneVision-Data's layout. Each stage runs as its own ``visor fit`` process, so its peak
resident memory (the process tree's, sampled) is its own; it is set beside ``visor sizing``'s prediction for the same
setup (:func:`visor_lightning.commands.sizing.predict_cpu_stage`). One stage is killed after its first checkpoint
and resumed with ``--ckpt_path last``; one stage runs DeepSpeed ZeRO-2 over 2 processes (gloo); the last stage's
weights are scored by ``visor eval`` on 8 samples. Full-state checkpoints (~11 GB at this size) are measured and
deleted as soon as the next stage no longer needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PIPELINE = "experiments/llava_ov_0.5b/pipeline.yaml"
MODEL = "experiments/llava_ov_0.5b/model.yaml"
# how a stage trains in the smoke run: what it is (its config) stays the recipe's
SMOKE_ARGS = ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--data.batches_per_epoch", "2",
              "--data.batch_size", "1", "--global_batch_size", "1", "--data.eval_batch_size", "1",
              "--data.num_workers", "0", "--data.shuffle_buffer", "4", "--data.shuffle_initial", "1",
              "--trainer.precision", "bf16-mixed", "--trainer.limit_val_batches", "1",
              "--trainer.num_sanity_val_steps", "0", "--model.init_args.max_new_tokens", "4",
              "--model.init_args.warmup_steps", "1", "--trainer.devices", "1"]
# the universal stage's feasible-set search scores all 2^7 = 128 subsets of the optional SA layers (5.5 min for one
# sample here) and, on random weights, keeps them all (every score is 0): the smoke run takes the recipe's `counts`
# set as it stands (8 configurations), so validation and the policy head have the sizes a real search gives
STAGE_ARGS = {"universal": ["--model.init_args.search", "false"]}
TRAIN_SIZES = [(288, 384), (384, 288)]  # (height, width) of the training photographs: both AnyRes 1x1 (2 crops)
ZERO2 = ["--config", "experiments/base/deepspeed_zero2.yaml"]
KILL_DRILL = "visor_lightning.callbacks.drills.KillAfterStep"  # SIGKILL (every rank) as step 2 starts


class PeakRSS:
    """Peak resident memory of a process and all its descendants, summed, sampled every ``every`` seconds from /proc
    (the DDP/DeepSpeed ranks of a stage are children of its ``visor fit`` process)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self.t0 = time.perf_counter()
        self.timeline: list[tuple[float, int]] = []  # (seconds, bytes), for the memory plot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def tree_rss(root: int) -> int:
        parent: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                parent[int(d.name)] = int(fields[1])
                rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        total, todo = 0, [root]
        while todo:
            p = todo.pop()
            total += rss.get(p, 0)
            todo += [c for c, pp in parent.items() if pp == p]
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.tree_rss(self.pid)
            self.peak = max(self.peak, rss)
            self.timeline.append((round(time.perf_counter() - self.t0, 2), rss))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


def run_child(argv: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """``visor argv`` as a child process in its own process group, its output appended to ``log``: exit code,
    seconds, peak resident memory of its process tree (and the sampled timeline), and its output."""
    offset = log.stat().st_size if log.exists() else 0
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ visor {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "visor_lightning", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        mem = PeakRSS(proc.pid)
        proc.wait()
    peak = mem.stop()
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": peak / 2**30,
            "timeline": mem.timeline, "text": text}


def run_fit(argv: list[str], root: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """``visor fit argv`` (:func:`run_child`) with its final metrics, each step's seconds and the checkpoint it resumed
    from (if any); the memory timeline goes to ``root/memory_timeline.json``."""
    from visor_lightning.lit.tracking import METRICS_ENV

    metrics_file = root / "final_metrics.json"
    metrics_file.unlink(missing_ok=True)
    res = run_child(argv, {**env, METRICS_ENV: str(metrics_file)}, log)
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory_timeline.json").write_text(json.dumps(res.pop("timeline")))
    res["killed"] = res["rc"] == -signal.SIGKILL
    res["metrics"] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    text = res.pop("text")
    res["step_seconds"] = step_seconds(text)
    resumed = [ln for ln in text.splitlines() if "--ckpt_path last: resuming from" in ln]  # lit/cli.latest_checkpoint
    res["resumed_from"] = resumed[-1].split("resuming from", 1)[1].strip() if resumed else None
    return res


def step_seconds(text: str) -> list[int]:
    """Seconds of each optimizer step of one run, from its progress lines (``[stage] step 2/2 | ... | elapsed
    0:01:05 | ...``, printed every step here); the first includes the loader's start."""
    import re

    elapsed = [int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
               for m in re.finditer(r"\] step \d+/\d+ \|.*?\| elapsed (\d+):(\d+):(\d+)", text)]
    return [b - a for a, b in zip([0, *elapsed], elapsed)]


def stage_setup(name: str, root: Path) -> dict[str, Any]:
    """What the run directory says about a finished stage: optimizer steps and the trained parameters."""
    from visor_lightning.lit.weights import read_config

    meta = read_config(root / "weights")
    return {"global_step": int(meta.get("global_step", -1)), "trainable_params": int(meta.get("trainable_params", 0))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visor realsize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/realsize", help="working directory (default runs/realsize)")
    p.add_argument("--zero2", default="stage1_ca", help="stages run with DeepSpeed ZeRO-2 over 2 processes "
                   "(comma-separated; default stage1_ca, the one whose two ranks fit 24 GB; '' for none)")
    p.add_argument("--zero2-devices", type=int, default=2, help="processes of a ZeRO-2 stage (default 2; on a one-GPU "
                   "machine 1)")
    p.add_argument("--resume", default="stage2_sft", help="the stage killed after its first checkpoint and resumed "
                   "with --ckpt_path last (default stage2_sft; '' for none)")
    p.add_argument("--stages", default=None, help="run only these stages (comma-separated; earlier ones must be done)")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and weights (about 30 GB) when done")
    p.add_argument("--model-config", default=MODEL, help=f"the shapes of the random checkpoint (default {MODEL})")
    p.add_argument("--schedule", default=None, metavar="JSON",
                   help="replace the layer schedule of the stage configs that set one, e.g. '{\"num_ca\": 1, "
                        "\"num_sa\": 2}' for a model shallower than 24 layers (the tests run the runner that way)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def realsize_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = run_realsize(Path(args.out), zero2=[s for s in args.zero2.split(",") if s], zero2_devices=args.zero2_devices,
                          resume=args.resume or None, only=args.stages.split(",") if args.stages else None,
                          keep=args.keep, model_config=args.model_config, schedule=args.schedule)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["table"])
    return 0 if report["ok"] else 1


def prepare(out: Path, model_config: str = MODEL) -> dict[str, str]:
    """The random checkpoint and the parquet fixture (kept between runs), and the environment the pipeline reads."""
    import hashlib

    from .realsize_fixtures import FIXTURE_SIZES, write_parquet_fixture, write_random_checkpoint

    ckpt = out / "llava-onevision-qwen2-0.5b-ov-random"
    source = hashlib.sha256(Path(model_config).read_bytes()).hexdigest()  # rewritten when the shapes change
    marker = ckpt / "realsize_source.txt"
    if not (ckpt / "model.safetensors").is_file() or not marker.is_file() or marker.read_text() != source:
        print(f"realsize: writing a random-weight LLaVA-OneVision directory at the shapes of {model_config} -> {ckpt}",
              flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        info = write_random_checkpoint(model_config, ckpt)
        marker.write_text(source)
        print(f"realsize: {info['params']:,} parameters, {info['bytes'] / 2**30:.2f} GiB on disk", flush=True)
    parquet = out / "parquet"
    # training rows at the 1x1 grid (the step's shapes are then known: the sizing prediction uses them); the dev rows
    # at every fixture size (AnyRes picks 1x1, 1x2, 2x1, 2x2 grids)
    write_parquet_fixture(parquet / "train", rows=8, files=2, sizes=TRAIN_SIZES)
    write_parquet_fixture(parquet / "dev", rows=8, files=1, sizes=FIXTURE_SIZES)
    return {"VISOR_LLAVA_OV": str(ckpt), "VISOR_STAGE1_PARQUET": str(parquet / "train" / "**" / "*.parquet"),
            "VISOR_STAGE2_PARQUET": str(parquet / "train" / "**" / "*.parquet"), "VISOR_DATA": str(out / "data"),
            "VISOR_OUT": str(out / "runs"), "VISOR_RUNS_ROOT": str(out), "HF_HUB_OFFLINE": "1"}


def max_text_tokens(ckpt: str) -> int:
    """The longest training conversation of the fixture in the checkpoint's tokens (chat template applied)."""
    from visor_lightning.data.schema import parse_record
    from visor_lightning.data.tokenizer import load_tokenizer

    from .realsize_fixtures import conversation

    tok = load_tokenizer(ckpt)
    longest = 0
    for i in range(2):  # conversations alternate 2 and 3 turns
        conv = conversation(i, *TRAIN_SIZES[0], "flower")
        msgs = parse_record({"id": f"longest-{i}", "conversations": conv}).messages
        longest = max(longest, len(tok.apply_chat_template(msgs, tokenize=True)))
    return longest


def run_realsize(out: Path, zero2: list[str], resume: str | None, only: list[str] | None = None,
                 keep: bool = False, zero2_devices: int = 2, model_config: str = MODEL,
                 schedule: str | None = None) -> dict[str, Any]:
    from visor_lightning.data.build import run_build

    from .pipeline import build_args, build_data, load_pipeline, stage_args

    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    env_vars = prepare(out, model_config)
    os.environ.update(env_vars)
    env = dict(os.environ)
    cfg = load_pipeline(PIPELINE)
    build_data(cfg["data"], restart=False)
    dev = {"source": "hf-parquet", "parquet": str(out / "parquet" / "dev" / "**" / "*.parquet"), "split": "dev",
           "no_progress": True}  # the validation split, as a pipeline's data.builds entry would be built
    run_build(build_args(dev, Path(env_vars["VISOR_DATA"]), where="realsize dev split"))
    val = ["--data.val", json.dumps({"dev": str(Path(env_vars["VISOR_DATA"]) / "dev-manifest.json")})]
    text_tokens = max_text_tokens(env_vars["VISOR_LLAVA_OV"])
    runs = Path(cfg["out"])
    log = out / "realsize.log"
    rows, done, ok = [], {}, True
    for st in cfg["stages"]:
        name, root = st["name"], runs / st["name"]
        if only is not None and name not in only:
            if (root / "weights" / "visor.json").is_file():
                done[name] = root
            continue
        if root.exists():
            shutil.rmtree(root)
        argv = stage_args(st, runs, cfg.get("experiment", "realsize"), done) + SMOKE_ARGS + STAGE_ARGS.get(name, []) + val
        if schedule and "schedule:" in Path(st["config"]).read_text():
            argv += ["--model.init_args.schedule", schedule]
        world = 1
        if name in zero2:
            world = zero2_devices
            argv += ZERO2 + ["--trainer.devices", str(world), "--global_batch_size", str(world)]  # 1 sample a rank
        print(f"== {name}{f' (ZeRO-2, {world} processes)' if name in zero2 else ''}: visor {' '.join(argv)}", flush=True)
        resumed = None
        if name == resume:
            drill = ["--checkpoint_every_n_steps", "1", "--trainer.callbacks+=" + KILL_DRILL]
            first = run_fit(argv + drill, root, env, log)
            print(f"   killed after its step-1 checkpoint ({first['seconds']:.0f} s, rc {first['rc']}); resuming",
                  flush=True)
            res = run_fit(argv + ["--ckpt_path", "last"], root, env, log)
            resumed = {"first_seconds": first["seconds"], "killed": first["killed"], "resumed_from": res["resumed_from"],
                       "steps_before_kill": len(first["step_seconds"]), "steps_after": len(res["step_seconds"])}
            res["step_seconds"] = first["step_seconds"] + res["step_seconds"]
        else:
            res = run_fit(argv, root, env, log)
        row: dict[str, Any] = {"stage": name, "world": world, "seconds": res["seconds"], "rc": res["rc"],
                               "peak_rss_gb": round(res["peak_rss_gb"], 2), "resume": resumed}
        problem = None
        if res["rc"] != 0 or not (root / "weights" / "visor.json").is_file():
            problem = f"exited with {res['rc']}; see {log}"
        elif resumed and not (resumed["killed"] and resumed["resumed_from"] and resumed["steps_before_kill"] == 1
                              and resumed["steps_after"] == 1 and stage_setup(name, root)["global_step"] == 2):
            problem = f"the kill and resume did not happen as planned ({resumed}); see {log}"
        if problem:
            row["error"] = problem
            rows.append(row)
            ok = False
            print(f"   FAILED: {row['error']}", flush=True)
            break
        src = st.get("from")  # the file the stage started from: the sizing's load term
        start = runs / src.split(":")[0] / "weights" if src else Path(env_vars["VISOR_LLAVA_OV"])
        row.update(measure_stage(name, root, res, start / "model.safetensors", world, zero2=name in zero2,
                                 text_tokens=text_tokens))
        rows.append(row)
        done[name] = root
        shutil.rmtree(root / "checkpoints", ignore_errors=True)  # full state: measured, not needed for hand-over
        print(f"   {name}: {row['seconds']:.0f} s, peak {row['peak_rss_gb']:.1f} GB (predicted {row['predicted_gb']:.1f}), "
              f"checkpoint {row['checkpoint_gb']:.1f} GB, {row['trainable_params']:,} trained parameters", flush=True)
    evaluation = None
    if ok and "policy" in done:
        evaluation = run_eval_smoke(done["policy"], cfg, env, log, val)
        ok = evaluation["rc"] == 0
    if not keep:  # the hand-over weights, and their copies in the MLflow artifact store beside out/mlflow.db
        for root in done.values():
            shutil.rmtree(root / "weights", ignore_errors=True)
            shutil.rmtree(root / "hf", ignore_errors=True)
        for copy in (out / "mlartifacts").glob("*/*/artifacts/weights"):
            shutil.rmtree(copy, ignore_errors=True)
    report = {"ok": ok, "rows": rows, "eval": evaluation, "seconds": round(time.perf_counter() - t_all, 1),
              "log": str(log)}
    report["table"] = markdown(report)
    (out / "realsize.json").write_text(json.dumps(report, indent=2))
    (out / "realsize.md").write_text(report["table"] + "\n")
    return report


def measure_stage(name: str, root: Path, res: dict[str, Any], started_from: Path, world: int, zero2: bool,
                  text_tokens: int) -> dict[str, Any]:
    """A finished stage's row: steps, trained parameters, one full-state checkpoint's size (a directory under
    DeepSpeed), step seconds, and ``visor sizing``'s prediction for the same setup beside the measured peak."""
    from .sizing import predict_cpu_stage

    row = stage_setup(name, root)
    last = root / "checkpoints" / "last.ckpt"
    size = dir_bytes(last) if last.is_dir() else last.stat().st_size if last.exists() else 0
    row.update(checkpoint_gb=round(size / 2**30, 2), checkpoints_dir_gb=round(dir_bytes(root / "checkpoints") / 2**30, 2),
               weights_gb=round(dir_bytes(root / "weights") / 2**30, 2), step_seconds=res["step_seconds"], zero2=zero2)
    if "cuda/max_allocated_gb" in res["metrics"]:
        row["cuda_peak_gb"] = round(res["metrics"]["cuda/max_allocated_gb"], 2)
    pred = predict_cpu_stage(root / "weights", trainable=row["trainable_params"], world=world, zero2=zero2,
                             images=TRAIN_SIZES, text_tokens=text_tokens, checkpoint_bytes=started_from.stat().st_size)
    row.update(predicted_gb=round(pred["total_gb"], 2), prediction=pred,
               ratio=round(res["peak_rss_gb"] / pred["total_gb"], 2))
    return row


def run_eval_smoke(root: Path, cfg: dict[str, Any], env: dict[str, str], log: Path, val: list[str]) -> dict[str, Any]:
    """``visor eval`` of the policy stage's weights on the 8 dev samples: the cheapest and the maximal configuration
    and the policy (every configuration would be 8 prefills a sample)."""
    from visor_lightning.lit.weights import read_config, schedule_from_dict

    config = next(st["config"] for st in cfg["stages"] if st["name"] == "policy")
    names = schedule_from_dict(read_config(root / "weights")["schedule"]).names
    targets = f"{names[0]},{names[-1]},policy"
    argv = ["eval", "--config", config, "--ckpt", str(root / "weights"), "--configs", targets, "--no-swap",
            "--out", str(root / "eval"), "--", *val, "--data.eval_batch_size", "4", "--data.num_workers", "0",
            "--trainer.precision", "bf16-mixed", "--model.init_args.max_new_tokens", "4"]
    print(f"== eval: visor {' '.join(argv)}", flush=True)
    child = run_child(argv, env, log)
    rc = child["rc"]
    res: dict[str, Any] = {"rc": rc, "seconds": child["seconds"], "peak_rss_gb": round(child["peak_rss_gb"], 2),
                           "targets": targets}
    doc = root / "eval" / "eval.json"
    if rc == 0 and doc.is_file():
        d = json.loads(doc.read_text())
        res["samples"] = {t: r["samples"] for s in d["results"].values() for t, r in s.items()}
        res["gflops"] = {t: round(r["gflops"], 1) for s in d["results"].values() for t, r in s.items()}
    print(f"   eval: {res['seconds']:.0f} s, rc {rc}, peak {res['peak_rss_gb']:.1f} GB", flush=True)
    return res


def markdown(report: dict[str, Any]) -> str:
    lines = ["| stage | processes | stage s | step s | peak RSS GB | `visor sizing` GB | measured / predicted | "
             "checkpoint GB | trained params (M) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['world']} | {r['seconds']:.0f} | | {r['peak_rss_gb']:.1f} | | | | | "
                         f"{r['error']} |")
            continue
        note = ""
        if r.get("resume"):
            note = (f"killed after step 1 ({r['resume']['first_seconds']:.0f} s), resumed from its "
                    f"{Path(r['resume']['resumed_from'] or '?').name}, trained step 2")
        steps = " / ".join(str(x) for x in r.get("step_seconds") or []) or "-"
        lines.append(f"| {r['stage']} | {r['world']} | {r['seconds']:.0f} | {steps} | {r['peak_rss_gb']:.1f} | "
                     f"{r['predicted_gb']:.1f} | {r['ratio']:.2f} | {r['checkpoint_gb']:.1f} | "
                     f"{r['trainable_params'] / 1e6:.1f} | {note} |")
    e = report.get("eval")
    if e:
        lines.append(f"\n`visor eval` ({e['targets']}) on 8 dev samples: {e['seconds']:.0f} s, peak {e['peak_rss_gb']:.1f} GB, "
                     f"rc {e['rc']}" + (f", GFLOPs / sample {e.get('gflops')}" if e.get("gflops") else ""))
    lines.append(f"\nTotal {report['seconds']:.0f} s; {'all stages completed' if report['ok'] else 'FAILED'}.")
    return "\n".join(lines)
