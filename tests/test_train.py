"""Staged training: the stage modules, LightningCLI, the pipeline, MLflow, resume after SIGKILL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from visor_lightning.lit.cli import accumulation, run_cli

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                       if "class_path: visor_lightning.lit." in p.read_text() and p.parent.name != "base")  # not fragments


def test_accumulation_from_global_batch():
    assert accumulation(128, 8, 4, 2) == 2
    assert accumulation(None, 8, 4, 1) == 1
    assert accumulation(64, 8, [0, 1], 1) == 4
    assert accumulation(64, 8, "2", 1) == 4 and accumulation(64, 8, "0,1", 1) == 4  # the CLI passes strings
    assert accumulation(64, 8, "auto", 1) == 64 // 8 // (torch.cuda.device_count() or 1)
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation(100, 8, 4, 1)


def test_fit_args_reach_training_only_and_multi_process_stages_run_as_their_own_process(monkeypatch, tmp_path):
    """The demo's base trains with DDP over 2 processes (fit_args): its `visor fit` gets the flags, its `visor eval`
    does not, and the pipeline runs it as a child process (in-process, Lightning's second rank would re-run the
    pipeline itself; the demo test runs it for real)."""
    from visor_lightning.commands.pipeline import launches_processes, load_pipeline, stage_args, stage_extra

    monkeypatch.setenv("VISOR_DATA", str(tmp_path))
    cfg = load_pipeline(ROOT / "experiments/debug/pipeline.yaml")
    done = {st["name"]: tmp_path / st["name"] for st in cfg["stages"]}
    argv = {st["name"]: stage_args(st, tmp_path, "x", done) for st in cfg["stages"]}
    for name in ("base", "dense_long"):
        assert " ".join(argv[name]).endswith("--trainer.devices 2 --data.batch_size 8")
        assert "--trainer.devices" not in stage_extra(cfg, name)
        assert launches_processes(argv[name])
    assert not any(launches_processes(a) for n, a in argv.items() if n not in ("base", "dense_long"))
    assert not launches_processes(argv["base"] + ["--trainer.devices=1"])  # the last one wins, as in the parser
    assert launches_processes(["fit", "--trainer.num_nodes", "2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nstages:\n  - {name: a, config: experiments/debug/stage0_base.yaml, fitargs: {x: 1}}\n")
    with pytest.raises(ValueError, match=r"bad.yaml line 3: unknown key stages\[0\].fitargs \(did you mean stages\[0\].fit_args\?\)"):
        load_pipeline(bad)


def test_every_stage_config_prints_its_resolved_config(demo_data, monkeypatch, capsys):
    monkeypatch.setenv("VISOR_DATA", str(demo_data))
    for path in STAGE_CONFIGS:
        with pytest.raises(SystemExit) as e:
            run_cli(["fit", "--config", str(path), "--print_config", "--global_batch_size", "64"])
        assert e.value.code == 0, path
        text = capsys.readouterr().out
        assert "class_path: visor_lightning.lit." in text and "default_root_dir" in text, path


def _handover_args(path: Path, pipe: dict) -> list[str]:
    """Point a stage config at the tiny pipeline's artifacts (and tiny shapes for the 0.5B configs)."""
    text = path.read_text()
    out = pipe["out"]
    args = []
    if "pretrained:" in text:
        args += ["--model.init_args.backbone.pretrained", str(out / "base" / "hf")]
    stage_from = {"FullFinetune": "ca_pretrain", "Universal": "full_finetune", "PolicyTraining": "universal"}
    for cls, src in stage_from.items():
        if f"lit.{cls}" in text:
            args += ["--model.init_args.init_from", str(out / src / "weights")]
    if "llava_ov_0.5b" in str(path):  # real-size data paths and an 8-CA schedule: swap in the tiny ones
        d = pipe["data"]
        args += ["--data.train", str(d / "easy_train-manifest.json"),
                 "--data.val", json.dumps({"easy": str(d / "easy_dev-manifest.json")}),
                 "--data.num_workers", "0", "--data.max_length", "4096"]
        if "lit.CAPretrain" in text:
            args += ["--model.init_args.schedule.num_ca", "2", "--model.init_args.schedule.num_sa", "3"]
        elif "schedule:" in text:
            args += ["--model.init_args.schedule", "null"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_dev_run_of_every_stage_config(path, tiny_pipeline, monkeypatch, tmp_path):
    monkeypatch.setenv("VISOR_DATA", str(tiny_pipeline["data"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline["uri"])
    cli = run_cli(["fit", "--config", str(path), "--trainer.fast_dev_run", "true", "--trainer.default_root_dir",
                   str(tmp_path), "--data.batch_size", "2", "--global_batch_size", "2", *_handover_args(path, tiny_pipeline)])
    assert cli.trainer.global_step == 1
    assert (tmp_path / "weights" / "visor.json").is_file()


@pytest.mark.slow
def test_pipeline_hands_over_and_summarises(tiny_pipeline):
    out = tiny_pipeline["out"]
    summary = json.loads((out / "summary.json").read_text())
    configs = [r["config"] for r in summary["rows"]]
    assert configs[:2] == ["dense", "dense_long"] and "policy (policy)" in configs and "policy (policy_budget)" in configs
    assert "| dense |" in summary["table"] and (out / "plots" / "summary_acc_vs_flops.png").stat().st_size > 5000
    for r in summary["rows"]:  # every row: both families, real and swapped images, from the evaluation sets
        assert set(r["acc"]) == set(r["acc_swapped"]) == {"easy", "hard"}
        assert all(0 <= v <= 1 for v in [*r["acc"].values(), *r["acc_swapped"].values()])
    policies = [r for r in summary["rows"] if r["kind"] == "policy"]
    assert {r["objective"] for r in policies} == {"pseudo_label", "budget"}
    assert all(0 <= r["mean_sa"][f] <= 3 for r in policies for f in ("easy", "hard"))
    assert set(summary["baselines"]) == {"easy", "hard"} and summary["findings"]
    assert {"a_models_see", "b_easy_needs_little", "c_hard_needs_sa", "d_one_network", "e_router",
            "f_token_pruning"} == set(summary["findings"])
    # the evaluation sets, not the development splits the stages validated on, are what the rows report
    doc = json.loads((out / "eval" / "base" / "eval.json").read_text())
    assert all(r["id"].startswith(("synthetic-easy_test-", "synthetic-hard_test-")) for r in doc["samples"])
    # dense_long trained as many optimizer steps as the VISOR chain after the base
    steps = {n: json.loads((out / n / "weights" / "visor.json").read_text())["global_step"]
             for n in ("ca_pretrain", "full_finetune", "universal", "dense_long")}
    assert steps["dense_long"] == steps["ca_pretrain"] + steps["full_finetune"] + steps["universal"] > 0
    # the FastV peer on dense_long, at each fixed configuration's FLOPs (equal-cost ones share a row)
    fixed = {r["config"]: r for r in summary["rows"] if r["kind"] == "fixed"}
    fastv = [r for r in summary["rows"] if r["kind"] == "fastv"]
    mean = lambda row: sum(row["gflops"].values()) / len(row["gflops"])  # noqa: E731
    covered = []
    for r in fastv:
        assert r["config"].startswith("fastv(k=1,")
        for name in r["matches"]:
            like = fixed[name]
            covered.append(name)
            assert abs(mean(r) - mean(like)) <= 0.05 * mean(like), (r["config"], mean(r), mean(like))
    # CA-only is cheaper than FastV dropping every visual token after layer 1: the three others are matched
    assert sorted(covered) == sorted(set(fixed) - {"sa[]"}) and len(fixed) == 4 and len(fastv) == 3
    assert (out / "fastv" / "eval.json").is_file()
    universal = json.loads((out / "universal" / "weights" / "visor.json").read_text())
    # the nested feasible set of stage1_ca.yaml, CA-only included; no search (it would score every subset)
    assert universal["schedule"]["feasible"] == [[], [0], [0, 3], [0, 3, 5]] and universal["schedule"]["always_on_sa"] == []
    assert summary["search"] is None and "search" not in universal
    policy = json.loads((out / "policy" / "weights" / "visor.json").read_text())
    router = json.loads((out / "router" / "weights" / "visor.json").read_text())
    assert policy["schedule"]["feasible"] == router["schedule"]["feasible"] == universal["schedule"]["feasible"]
    assert (policy["policy_head"], router["policy_head"]) == ("choice", "correctness")
    # the router's knob sweep: one row per max_acc_drop value of the pipeline, each scored with swapped images too
    sweep = [r for r in summary["rows"] if r["kind"] == "sweep"]
    assert [r["knob"] for r in sweep] == [0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1]
    assert all(r["acc_swapped"]["hard"] is not None and set(r["task_acc"]) >= {"tally", "locate", "beside"} for r in sweep)
    assert sweep[-1]["mean_sa"] == {"easy": 0.0, "hard": 0.0}  # max_acc_drop=1: always the cheapest, CA-only
    assert "e_router" in summary["findings"] and "tally" in summary["table"].splitlines()[0]
    # the exported dense base is a real LLaVA-OneVision directory
    from transformers import LlavaOnevisionConfig

    assert LlavaOnevisionConfig.from_pretrained(out / "base" / "hf").text_config.num_hidden_layers == 6


@pytest.mark.slow
def test_mlflow_holds_params_metrics_plot_and_weights(tiny_pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_pipeline["uri"])
    exp = client.get_experiment_by_name("visor-test")
    from visor_lightning.lit.tracking import code_version

    sha = code_version()[0]
    found = client.search_runs([exp.experiment_id])
    # stable names <experiment>-<stage>-<short commit>, and tags to compare runs by
    assert all(re.fullmatch(rf"visor-test-\w+-{sha[:7]}", r.info.run_name) for r in found), [r.info.run_name for r in found]
    runs = {r.info.run_name.removeprefix("visor-test-").rsplit("-", 1)[0]: r for r in found}
    for name in ("base", "universal", "policy"):
        tags = runs[name].data.tags
        assert tags["git_commit"] == sha and re.fullmatch(r"[0-9a-f]{12}", tags["data"])
        assert tags["backbone"].startswith("d64-L6-h4/2-v")
    assert runs["ca_pretrain"].data.tags["backbone_checkpoint"].endswith("base/hf")  # loaded as a LLaVA-OV checkpoint
    assert runs["base"].data.tags["data"] == runs["universal"].data.tags["data"]  # the same shards
    assert {"pipeline", "base", "ca_pretrain", "full_finetune", "universal", "policy", "policy_budget"} <= set(runs)
    parent = runs["pipeline"].info.run_id
    for name in ("base", "ca_pretrain", "universal", "policy"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] in name + "_pretrain"
        assert run.info.status == "FINISHED"
        assert run.data.params["model.class_path"].startswith("visor_lightning.lit.")
        assert "data.batch_size" in run.data.params
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert history and all(torch.isfinite(torch.tensor(m.value)) for m in history)
        flops = client.get_metric_history(run.info.run_id, "train/gflops_per_sample")  # counted on every logged step
        assert [m.step for m in flops] == [m.step for m in history] and all(m.value > 0 for m in flops)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "eval.json", "plots", "weights"} <= arts
        assert {a.path for a in client.list_artifacts(run.info.run_id, "weights")} == {"weights/model.safetensors", "weights/visor.json"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/acc_vs_flops.png"]
    metrics = runs["policy"].data.metrics
    assert any(k.startswith("val/easy/acc/") for k in metrics) and "val/hard/flops_saving/policy" in metrics
    assert any(k.startswith("val/easy/policy_share/") for k in metrics)
    assert "data/read" in runs["base"].data.metrics
    summary_arts = {a.path for a in client.list_artifacts(parent)}
    assert {"summary.md", "summary.json", "plots"} <= summary_arts


@pytest.mark.slow
def test_pipeline_rerun_keeps_finished_work_and_its_parent_run(tiny_pipeline, monkeypatch, capsys):
    """`visor pipeline` again on a finished output: every stage and evaluation kept, weights untouched, the same parent
    MLflow run; the stage args of the first run reached every stage (2 optimizer steps each)."""
    from conftest import TINY_STEPS
    from visor_lightning.commands.pipeline import load_pipeline, run_pipeline

    out = tiny_pipeline["out"]
    monkeypatch.setenv("VISOR_DATA", str(tiny_pipeline["data"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline["uri"])
    cfg = load_pipeline(ROOT / "experiments/debug/pipeline.yaml")
    cfg.update(out=str(out), experiment="visor-test")
    cfg.pop("data")
    parent = (out / "mlflow_parent_run_id").read_text()
    weights = {p: p.stat().st_mtime_ns for p in out.glob("*/weights/model.safetensors")}
    assert len(weights) == len(cfg["stages"])
    capsys.readouterr()
    assert run_pipeline(cfg, extra=TINY_STEPS.split()) == 0
    text = capsys.readouterr().out
    for st in cfg["stages"]:
        assert f"== stage {st['name']}: finished earlier ({out / st['name']}/weights), kept" in text
    assert text.count("done earlier") == len(cfg["summary"]["visor"]) + 2  # dense, dense_long and each VISOR stage
    assert (out / "mlflow_parent_run_id").read_text() == parent
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    steps = {st["name"]: json.loads((out / st["name"] / "weights" / "visor.json").read_text())["global_step"]
             for st in cfg["stages"]}
    assert {n: s for n, s in steps.items() if n != "dense_long"} == {n: 2 for n in steps if n != "dense_long"}


def test_pipeline_only_data_builds_once_then_keeps(tmp_path, capsys, monkeypatch):
    from visor_lightning.commands.pipeline import pipeline_main

    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"out: {tmp_path / 'out'}\nexperiment: t\ndata:\n  dir: {tmp_path / 'data'}\n  builds:\n"
                   "    - {source: synthetic, split: s, tasks: shape, max_samples: 12, shard_size: 6, image_size: 32}\n"
                   "stages:\n  - {name: base, config: experiments/debug/stage0_base.yaml}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    assert pipeline_main(["--config", str(cfg), "--only-data"]) == 0
    first = capsys.readouterr().out
    assert pipeline_main(["--config", str(cfg), "--only-data"]) == 0
    second = capsys.readouterr().out
    assert (tmp_path / "data" / "s-manifest.json").is_file() and "kept" not in first
    assert "data: s already built (12 samples), kept" in second
    assert "== stage" not in first + second and not (tmp_path / "out" / "base").exists()  # no stage ran


@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_score_a_stages_weights(tiny_pipeline, monkeypatch, tmp_path, command):
    monkeypatch.setenv("VISOR_DATA", str(tiny_pipeline["data"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cli = run_cli([command, "--config", str(ROOT / "experiments/debug/stage2_full.yaml"),
                   "--model.init_args.init_from", str(tiny_pipeline["out"] / "full_finetune" / "weights"),
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", "0",
                   "--model.init_args.eval_configs", "all"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    prefix = "val" if command == "validate" else "test"
    for family in ("easy", "hard"):  # every feasible configuration scored on both sets
        for config in ("sa", "sa_0", "sa_0_3", "sa_0_3_5"):
            assert 0.0 <= metrics[f"{prefix}/{family}/acc/{config}"] <= 1.0, sorted(metrics)
    # validate reads the development sets (data.val), test the held-out ones (data.test), and nothing else
    dm = cli.datamodule
    read = {split: {k: s.read for k, s in getattr(dm, f"{split}_stats", {}).items()} for split in ("val", "test")}
    other = "test" if prefix == "val" else "val"
    assert read[prefix] == {"easy": 16, "hard": 16} and not any(read[other].values()), read
    urls = dm.test_urls if prefix == "test" else dm.val_urls
    assert all(f"{family}_{'test' if prefix == 'test' else 'dev'}-" in u for family in ("easy", "hard") for u in urls[family])


@pytest.mark.slow
def test_pipeline_restart_trains_a_finished_stage_again_under_a_new_parent_run(demo_data, tmp_path, monkeypatch, capsys):
    from conftest import TINY_STEPS
    from visor_lightning.commands.pipeline import run_pipeline

    monkeypatch.setenv("VISOR_DATA", str(demo_data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cfg = {"out": str(tmp_path / "out"), "experiment": "restart",
           "stages": [{"name": "base", "config": "experiments/debug/stage0_base.yaml"}],
           "summary": {"dense": "base", "eval": {"sets": {"easy": str(demo_data / "easy_test-manifest.json")}}}}
    weights = tmp_path / "out" / "base" / "weights" / "model.safetensors"
    parent = tmp_path / "out" / "mlflow_parent_run_id"
    assert run_pipeline(cfg, extra=TINY_STEPS.split()) == 0
    first = (weights.stat().st_mtime_ns, parent.read_text())
    assert run_pipeline(cfg, extra=TINY_STEPS.split()) == 0  # kept: same weights, same parent run
    assert "== stage base: finished earlier" in capsys.readouterr().out
    assert (weights.stat().st_mtime_ns, parent.read_text()) == first
    assert run_pipeline(cfg, restart=True, extra=TINY_STEPS.split()) == 0  # redone, in a new parent run
    text = capsys.readouterr().out
    assert "finished earlier" not in text and "done earlier" not in text and "== stage base: done in" in text
    assert weights.stat().st_mtime_ns != first[0] and parent.read_text() != first[1]
