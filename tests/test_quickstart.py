"""docs/quickstart.md's walk-through after the demo, every command as written, on a tiny run of the same pipeline:
`runs/demo` is the tiny run's directory, `.venv/bin/` this interpreter."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## After the demo"


def walkthrough() -> list[str]:
    """The commands of the section's bash block, comments dropped."""
    text = (ROOT / "docs/quickstart.md").read_text().split(SECTION, 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _argv(line: str, out: Path) -> list[str]:
    argv = shlex.split(line.replace("runs/demo", str(out)))
    if argv[0] == ".venv/bin/visor":
        return [sys.executable, "-m", "visor_lightning", *argv[1:]]
    assert argv[0] == ".venv/bin/python", line
    return [sys.executable, *argv[1:]]


def _serve(argv: list[str], env: dict) -> str:
    """`visor ui` up and answering on the store the walk-through logged to: its experiments, as JSON."""
    from conftest import visor_ui

    with visor_ui(argv, env) as base:
        req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search", json.dumps({"max_results": 50}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()


@pytest.mark.slow
def test_every_quickstart_command_runs(tiny_pipeline):
    out = tiny_pipeline["out"]
    env = {**os.environ, "VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"],
           "HF_HUB_OFFLINE": "1"}
    lines = walkthrough()
    assert [shlex.split(x)[1] if x.startswith(".venv/bin/visor") else "python" for x in lines] == \
        ["eval", "eval", "flops", "python", "ask", "ui"]
    printed = []
    for line in lines:
        argv = _argv(line, out)
        if argv[3:4] == ["ui"]:
            printed.append(_serve(argv, env))
            continue
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-3000:])
        printed.append(done.stdout)
    uni, router, flops, scene, ask, ui = printed
    assert "| hard | sa[0,3,5] |" in uni and "not scored: no policy stage has trained" in uni
    assert (out / "universal" / "eval_test" / "eval.json").is_file()
    assert "| hard | policy(max_acc_drop=0.05) |" in router
    assert "6 layers x width 64" in flops and "(shapes from weights" in flops
    assert "How many purple squares are there?" in scene and (out / "scene.png").is_file()
    assert "answer:" in ask and "chosen by the router at max_acc_drop=0" in ask
    assert '"visor-test"' in ui  # the store the tiny pipeline and these evaluations logged to
