"""One error style for every entry point: `visor <command>: error: ...` on stderr, exit status 2, every unknown key at
once with its file and line (or where it was given) and a "did you mean", no traceback unless VISOR_TRACEBACK=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from visor_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "experiments/debug/stage2_full.yaml"
TYPOS = {"data.batch_sise": "data.batch_size", "data.num_workrs": "data.num_workers"}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """A stage config with two typos under data:, and a pipeline that uses it and has a typo of its own."""
    d = tmp_path_factory.mktemp("bad")
    text = STAGE.read_text().replace("  batch_size: 16\n", "  batch_sise: 16\n  num_workrs: 0\n", 1)
    stage = d / "stage.yaml"
    stage.write_text(text)
    lines = {k: 1 + text.splitlines().index(f"  {k.split('.')[1]}: " + ("16" if "sise" in k else "0")) for k in TYPOS}
    pipeline = d / "pipeline.yaml"
    pipeline.write_text(f"out: {d / 'out'}\nstages:\n  - {{name: full, config: {stage}}}\nsumary: {{dense: full}}\n")
    return {"stage": stage, "lines": lines, "pipeline": pipeline}


def _expected(bad: dict) -> list[str]:
    return [f"{bad['stage']} line {bad['lines'][k]}: unknown key {k} (did you mean {v}?)" for k, v in TYPOS.items()]


def _cases(bad: dict) -> list[tuple[str, list[str], list[str]]]:
    """(command, argv, lines the error must hold)"""
    stage, override = str(bad["stage"]), "the command line: unknown key trainer.max_step (did you mean trainer.max_steps?)"
    return [
        ("eval", ["eval", "--config", stage, "--ckpt", str(ROOT), "--", "--trainer.max_step", "3"], [*_expected(bad), override]),
        ("submit", ["submit", "--config", stage, "--dry-run", "--", "--trainer.max_step", "3"], [*_expected(bad), override]),
        ("flops", ["flops", "--config", stage], _expected(bad)),
        ("pipeline", ["pipeline", "--config", str(bad["pipeline"])],
         [f"{bad['pipeline']} line 4: unknown key sumary (did you mean summary?)", *_expected(bad)]),
        ("pipeline", ["pipeline", "--config", str(ROOT / "experiments/debug/pipeline.yaml"), "--stage-args",
                      "--trainer.max_step 3 --data.batch_sise 2"],
         ["--stage-args: unknown key trainer.max_step (did you mean trainer.max_steps?)",
          "--stage-args: unknown key data.batch_sise (did you mean data.batch_size?)"]),
    ]


def test_every_entry_point_reports_every_unknown_key_the_same_way(bad, capsys, monkeypatch):
    monkeypatch.delenv("VISOR_TRACEBACK", raising=False)
    for command, argv, lines in _cases(bad):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"visor {command}: error: "), err
        for line in lines:
            assert line in err, (argv, line, err)
        assert "Traceback" not in err and "VISOR_TRACEBACK=1" in err


def test_visor_fit_from_the_shell_and_the_traceback_flag(bad):
    """fit goes through LightningCLI's parser: checked before it, from a real shell (one line per problem)."""
    cmd = [sys.executable, "-m", "visor_lightning", "fit", "--config", str(bad["stage"]), "--trainer.max_step", "3"]
    env = {k: v for k, v in os.environ.items() if k != "VISOR_TRACEBACK"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("visor fit: error: 3 unknown keys:"), done.stderr[-2000:]
    for line in [*_expected(bad), "the command line: unknown key trainer.max_step (did you mean trainer.max_steps?)"]:
        assert line in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 5
    loud = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env, "VISOR_TRACEBACK": "1"}, timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


@pytest.mark.parametrize("yaml_text, shown", [
    ("model:\n  class_path: visor_lightning.lit.Universal\n  init_args:\n    tolerence: 0.9\n    lr: 1\n    lrr: 2\n",
     ["line 4: unknown key model.init_args.tolerence (did you mean model.init_args.tolerance?)",
      "line 6: unknown key model.init_args.lrr (did you mean model.init_args.lr?)"]),
    ("model:\n  class_path: visor_lightning.lit.DenseBase\n  init_args:\n    backbone:\n      text: {num_layer: 2}\n",
     ["line 5: unknown key model.init_args.backbone.text.num_layer (did you mean model.init_args.backbone.text.num_layers?)"]),
    ("trainer:\n  zzz: 1\n", ["line 2: unknown key trainer.zzz (expected one of: "]),
])
def test_keys_are_checked_against_the_classes_they_configure(tmp_path, yaml_text, shown):
    from visor_lightning.config_check import ConfigError, check_stage_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        check_stage_args(["fit", "--config", str(cfg)])
    for s in shown:
        assert f"{cfg} {s}" in str(e.value)


def test_every_shipped_config_passes_the_check():
    from visor_lightning.config_check import check_model_keys, check_stage_args

    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        text = path.read_text()
        if "\nstages:" in text or "\ntask:" in text:
            continue  # pipelines (load_pipeline checks them: test_train.py) and lmms-eval tasks
        if "class_path:" in text or "model:" not in text:
            check_stage_args(["fit", "--config", str(path)])
        else:
            check_model_keys(path)
