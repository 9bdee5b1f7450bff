"""The ``visor`` command and the experiment configs it reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from visor_lightning.cli import main
from visor_lightning.config import load_model_section

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").rglob("*.yaml"))


def test_there_are_configs():
    assert {p.parent.name for p in CONFIGS} >= {"debug", "llava_ov_0.5b"}


def _kind(path: Path) -> str:
    text = path.read_text()
    if "\ntask:" in text and "\ndataset_path:" in text:
        return "lmms-task"  # an lmms-eval task (experiments/lmms_eval), run by lmms-eval's own command line
    if "\nstages:" in text:
        return "pipeline"
    if "class_path: visor_lightning.lit." in text:
        return "stage"
    if "\nmodel:" not in text:
        return "fragment"  # e.g. experiments/base/ddp.yaml, added to a stage's --config
    return "model"


def _check_lmms_task(path: Path, first: str) -> None:
    """Headed by the lmms-eval command that runs it; every ``!function utils.x`` exists."""
    import importlib.util

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    task = yaml.load(path.read_text(), Loader=Loader)
    if "include" in task:  # lmms-eval's template mechanism: the included file's keys, then the task's own
        task = {**yaml.load((path.parent / task.pop("include")).read_text(), Loader=Loader), **task}
    assert task["output_type"] == "generate_until"
    assert first.startswith("# lmms-eval --model visor ") and f"--tasks {task['task']} " in first
    assert f"--include_path {path.parent.relative_to(ROOT)}" in first
    spec = importlib.util.spec_from_file_location("lmms_task_utils", path.parent / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    refs = [v[1] for v in task.values() if isinstance(v, tuple)]
    assert refs and all(callable(getattr(utils, r.split(".", 1)[1])) for r in refs), refs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_is_headed_by_its_command_and_parses(path, capsys):
    first = path.read_text().splitlines()[0]
    if _kind(path) == "lmms-task":
        _check_lmms_task(path, first)
        return
    assert first.startswith("# visor "), f"{path} must start with the command that runs it"
    assert str(path.relative_to(ROOT)) in first
    kind = _kind(path)
    assert first.startswith({"pipeline": "# visor pipeline --config", "stage": "# visor fit --config",
                             "fragment": "# visor fit --config", "model": "# visor flops --config"}[kind])
    if kind == "pipeline":  # stage configs are parsed (and fast_dev_run) in test_train.py
        from visor_lightning.commands.pipeline import load_pipeline

        assert load_pipeline(path)["stages"]
        return
    if kind in ("stage", "fragment"):  # parsed by LightningCLI in test_train.py / test_stages.py
        return
    section = load_model_section(path)
    assert section.schedule.num_layers == section.backbone.text.num_layers
    assert main(["flops", "--config", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["config"] == "dense" and len(rows) == 1 + len(section.schedule.feasible)


def test_flops_workload_flags_set_the_counts(capsys):
    """--text-tokens, --visual-tokens and --kv-bytes reach every row: FLOPs from the FLOPs model at those counts, the
    visual KV by hand (SA layers and CA blocks hold visual keys: x tokens x K and V x 2 KV heads x 16 dims x bytes)."""
    from visor_lightning.flops import FlopsModel

    assert main(["flops", "--config", "experiments/debug/tiny.yaml", "--json", "--text-tokens", "10", "--visual-tokens",
                 "20", "--kv-bytes", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    sec = load_model_section(ROOT / "experiments/debug/tiny.yaml")
    fm = FlopsModel(sec.backbone, sec.schedule, sec.policy_width)
    assert (out["workload"]["text_tokens"], out["workload"]["visual_tokens"], out["workload"]["bytes_per_element"]) == (10, 20, 4)
    for r, active in zip(out["rows"], [None, *sec.schedule.feasible]):
        assert (r["text_tokens"], r["visual_tokens"]) == (10, 20)
        assert r["prefill_flops"] == fm.prefill(active, 10, 20), r["config"]  # VISOR rows: the policy MLP included
        layers = 6 if active is None else len(active) + len(sec.schedule.ca_layers)  # SA layers, and CA blocks' K/V
        assert r["visual_kv_bytes"] == layers * 20 * 2 * 2 * 16 * 4, r["config"]


def test_bench_serve_eager_decode_prices_the_launches(capsys):
    rows = []
    for flag in ([], ["--eager-decode"]):
        assert main(["bench", "serve", "--config", "experiments/debug/tiny.yaml", "--grids", "1x1", *flag, "--json"]) == 0
        rows.append({r["config"]: r for r in json.loads(capsys.readouterr().out)["grids"][0]["rows"]})
    graphs, eager = rows
    for name in graphs:  # a decode step replayed as a CUDA graph skips the per-op launch cost; eager pays it
        assert eager[name]["decode_tokens_per_s"]["1"] < graphs[name]["decode_tokens_per_s"]["1"], name
        assert eager[name]["prefill_ms"] == graphs[name]["prefill_ms"]


def test_flops_json_for_05b(capsys):
    assert main(["flops", "--config", str(ROOT / "experiments/llava_ov_0.5b/model.yaml"), "--json", "--grid", "1x1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"]["visual_tokens"] == 729 + 27 * 28 and out["schedule"] == "SC." + "sC." * 7
    assert main(["flops", "--config", str(ROOT / "experiments/llava_ov_0.5b/model.yaml")]) == 0
    assert "| dense | all |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("model:\n  backbone:\n    text:\n      hiden_size: 8\n", "hiden_size"),
        ("model:\n  backbone:\n    text:\n      num_layers: many\n", "num_layers"),
        ("model:\n  schedul: {}\n", r"line 2: unknown key model\.schedul \(did you mean model\.schedule\?\)"),
        ("model:\n  schedule:\n    ca_layers: [1, 99]\n", "schedule.ca_layers"),
        ("trainer: {}\n", "no 'model:' section"),
        ("model:\n  backbone:\n    pretrained: /nonexistent/llava\n", "config.json"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, yaml_text, match, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as raised:
        load_model_section(cfg)
    assert str(cfg) in str(raised.value)  # the file, as well as the key
    assert main(["flops", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visor flops: error: ") and str(cfg) in err and re.search(match, err), err


def test_missing_config_file(capsys):
    assert main(["flops", "--config", "no/such.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pretrained_directory_supplies_the_shapes(tiny_checkpoint, tmp_path, spec):
    cfg = tmp_path / "ckpt.yaml"
    cfg.write_text(f"model:\n  backbone:\n    pretrained: {tiny_checkpoint}\n  schedule:\n    num_ca: 2\n")
    section = load_model_section(cfg)
    assert section.backbone.text == spec.text and section.backbone.pretrained == str(tiny_checkpoint)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from visor_lightning.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "visor_lightning", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "flops" in res.stdout and "demo" in res.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    result_file = tmp_path / "result.json"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "4", "--repeats", "2", "--json", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    rows = result["rows"]
    assert rows[0]["config"] == "dense" and len(rows) == 5
    assert all(r["cache_equal"] for r in rows)
    assert all(abs(r["measured"] - r["analytic"]) <= 0.02 * r["measured"] for r in rows)
    assert all(r["flops_saving"] > 1 for r in rows[1:]) and result["policy_mixed_equal"]
    assert "demo OK" in capsys.readouterr().out


def _all_parsers():
    import argparse

    from visor_lightning.cli import build_parser
    from visor_lightning.commands import ask, config_reference, evaluate, pipeline, realsize, slurm

    todo = [("visor", build_parser())] + [(m.__name__.rsplit(".", 1)[1], m.build_parser())
                                          for m in (ask, config_reference, evaluate, pipeline, realsize, slurm)]
    while todo:
        name, p = todo.pop()
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sp) for n, sp in a.choices.items()]


def test_every_option_of_every_command_has_help_text():
    import argparse

    missing = [f"{name} {a.option_strings or a.dest}" for name, p in _all_parsers() for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, missing


@pytest.mark.parametrize("command", ["eval", "submit", "pipeline", "ask", "realsize", "flops", "sizing", "data build"])
def test_help_is_fast(command):
    """`--help` imports no Lightning, torch or transformers where the command's parser does not need them (eval,
    submit and pipeline took 8-9 s). Measured as what a fresh interpreter imports, not as time (shared machines)."""
    code = ("import sys\nfrom visor_lightning.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('lightning', 'transformers', 'deepspeed', 'mlflow') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code, *command.split(), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert "usage:" in done.stdout and "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
