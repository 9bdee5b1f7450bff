"""What a researcher meets first: clean logs, progress lines in non-terminal logs, pure ``--json`` output, and
configuration names that work on every model."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visor_lightning.callbacks.progress_lines import clock, default_every
from visor_lightning.cli import main
from visor_lightning.commands.evaluate import run_eval
from visor_lightning.models import LayerSchedule, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Tip:", "litlogger", "LeafSpec", "The `srun` command is available", "noload", "Loading weights",
         "Writing model shards", "LightningCLI's args parameter", "Trainer already configured with model summary")


def test_progress_line_interval_and_clock():
    assert default_every(900) == 50 and default_every(300) == 30 and default_every(5) == 1
    assert clock(3725.9) == "1:02:05" and clock(-3) == "0:00:00"


def _fit_to_file(demo_data: Path, tmp: Path, show_all: bool) -> tuple[str, str]:
    env = {**os.environ, "VISOR_DATA": str(demo_data), "HF_HUB_OFFLINE": "1"}
    env.pop("SLURM_JOB_ID", None)
    if show_all:
        env["VISOR_SHOW_ALL_LOGS"] = "1"
    tmp.mkdir(parents=True, exist_ok=True)
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        subprocess.run([sys.executable, "-m", "visor_lightning", "fit", "--config", "experiments/debug/stage0_base.yaml",
                        "--trainer.max_steps", "4", "--data.batches_per_epoch", "4", "--global_batch_size", "4",
                        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.limit_val_batches", "1",
                        "--trainer.log_every_n_steps", "2",  # steps that log and steps that do not
                        "--trainer.default_root_dir", str(tmp / "run"), "--mlflow", "false"],
                       cwd=ROOT, env=env, stdout=o, stderr=e, check=True, timeout=600)
    return out.read_text(), err.read_text()


@pytest.mark.slow
def test_fit_into_a_file_prints_progress_lines_and_no_known_noise(demo_data, tmp_path):
    stdout, stderr = _fit_to_file(demo_data, tmp_path, show_all=False)
    steps = [line for line in stdout.splitlines() if line.startswith("[base] step ")]
    assert [s.split("|")[0].strip() for s in steps] == [f"[base] step {i}/4" for i in range(1, 5)]
    for line in steps:
        assert " | loss " in line and " samples/s | elapsed " in line and "| ETA " in line
    assert any(line.startswith("[base] validation: val/easy/acc/dense ") for line in stdout.splitlines())
    assert "━" not in stdout  # no Rich bar drawn into a file
    both = stdout + stderr
    assert not [n for n in NOISE if n in both], both
    # the same run with the filters off shows the noise: the assertion above can fail
    loud_out, loud_err = _fit_to_file(demo_data, tmp_path / "loud", show_all=True)
    assert "Tip:" in loud_out + loud_err


def _json(capfd, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capfd.readouterr().out
    return json.loads(out)  # the whole of stdout is one document


def test_every_json_command_writes_one_document(capfd, demo_data):
    tiny = str(ROOT / "experiments/debug/tiny.yaml")
    assert _json(capfd, ["flops", "--config", tiny, "--json"])["rows"][0]["config"] == "dense"
    assert _json(capfd, ["sizing", "--json"])["rows"]
    assert _json(capfd, ["data", "verify", "--dir", str(demo_data), "--split", "easy_dev", "--json"])["ok"]
    res = _json(capfd, ["bench", "prefill", "--config", tiny, "--repeats", "1", "--warmup", "0", "--json",
                        "--profile", "h100-sxm"])  # an assumed profile: measuring one is tested in test_costmodel
    assert res["rows"][0]["config"] == "dense"
    assert _json(capfd, ["bench", "serve", "--config", tiny, "--grids", "1x1", "--json"])["grids"][0]["rows"]
    assert _json(capfd, ["bench", "profile", "--datasheet", "a100-sxm-80gb", "--json"])["assumed"]


@pytest.mark.slow
def test_eval_json_is_pure_on_a_real_stdout(tiny_pipeline):
    """Through a pipe, as `visor eval ... --json | jq` reads it: Lightning's and Rich's output go to stderr."""
    env = {**os.environ, "VISOR_DATA": str(tiny_pipeline["data"]), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    run = tiny_pipeline["out"] / "base"
    proc = subprocess.run([sys.executable, "-m", "visor_lightning", "eval", "--config", str(run / "config.yaml"),
                           "--ckpt", str(run / "weights"), "--configs", "all", "--no-swap", "--out",
                           str(run / "eval_json"), "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    doc = json.loads(proc.stdout)
    assert set(doc["results"]["easy"]) == {"dense"}  # a dense model: its one configuration, no policy row
    assert "Validat" in proc.stderr or "GPU available" in proc.stderr  # the chatter went to stderr, not away


def test_configuration_names_accept_dense_on_a_dense_model():
    dense = LayerSchedule.dense(4)
    assert dense.names == ["dense"]
    assert dense.index("dense") == dense.index("sa[0,1,2,3]") == 0
    assert dense.canonical("sa[0,1,2,3]") == "dense"
    visor = LayerSchedule.build(6, ScheduleConfig())
    assert "dense" not in visor.names
    with pytest.raises(ValueError, match="has CA layers"):
        visor.index("dense")


def test_eval_names_on_dense_and_visor_models_and_run_configs(tiny_pipeline, tmp_path):
    out = tiny_pipeline["out"]
    env = {"VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        base = out / "base"
        doc = run_eval([str(base / "config.yaml")], str(base / "weights"), targets="sa[0,1,2,3,4,5]",
                       out=str(tmp_path / "b"), swap=False)
        assert list(doc["results"]["easy"]) == ["dense"]
        uni = out / "universal"
        doc = run_eval([str(uni / "config.yaml")], str(uni / "weights"), targets="all", out=str(tmp_path / "u"),
                       swap=False)  # the run's own config.yaml (it carries fit's ckpt_path)
        assert "sa[0]" in doc["results"]["easy"] and "dense" not in doc["results"]["easy"]
        with pytest.raises(ValueError, match="dense"):
            run_eval([str(uni / "config.yaml")], str(uni / "weights"), targets="dense", out=str(tmp_path / "x"),
                     swap=False)
        assert main(["fit", "--config", str(uni / "config.yaml"), "--trainer.max_steps", "1",
                     "--data.batches_per_epoch", "1", "--trainer.limit_val_batches", "1",
                     "--trainer.default_root_dir", str(tmp_path / "refit"), "--mlflow", "false",
                     "--model.init_args.init_from", str(uni / "weights")]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_no_command_module_imports_the_cli():
    """cli.py imports the commands; a command importing cli.py back would make an import circle."""
    for path in (ROOT / "visor_lightning/commands").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("visor_lightning.cli", "cli") and not (node.level and node.module == "cli"), path
                assert not (node.level == 2 and node.module == "cli"), path


def test_mlflow_artifacts_sit_beside_the_store_whatever_the_working_directory(tiny_pipeline):
    """MLflow's default puts a new experiment's artifacts in ./mlruns of whichever process created it; every
    experiment here keeps them in <store dir>/mlartifacts, so they travel with the store."""
    from mlflow import MlflowClient

    store = Path(tiny_pipeline["uri"][len("sqlite:///"):]).resolve().parent
    client = MlflowClient(tiny_pipeline["uri"])
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    assert exps
    for e in exps:
        assert e.artifact_location.startswith((store / "mlartifacts").as_uri()), (e.name, e.artifact_location)
    runs = client.search_runs([e.experiment_id for e in exps])
    logged = [r for r in runs if client.list_artifacts(r.info.run_id)]
    assert logged and all(Path(r.info.artifact_uri.removeprefix("file://")).is_dir() for r in logged)


def test_make_clean_keeps_the_mlflow_store(tmp_path):
    """`make clean` removes run directories, not the runs browsed in MLflow; `make clean-all` removes both."""
    import shutil

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for f in ("runs/mlflow.db", "runs/mlartifacts/visor-demo/abc/artifacts/x.png", "runs/demo/base/weights/w",
              "runs/realsize/realsize.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    assert subprocess.run(["make", "-s", "clean"], cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mlartifacts", "mlflow.db"]
    assert (tmp_path / "runs/mlartifacts/visor-demo/abc/artifacts/x.png").is_file()
    assert subprocess.run(["make", "-s", "clean-all"], cwd=tmp_path).returncode == 0
    assert not (tmp_path / "runs").exists()


def test_flops_describes_the_model_a_stage_config_trains(tiny_pipeline, tmp_path, capsys):
    """A run's config.yaml is described by the weights beside it, a stage config by its init_from, --weights by the
    directory; a stage config that names no shapes says it is using the defaults (it printed the 0.5B table as if
    it were the trained model)."""
    from visor_lightning.lit.weights import read_config, schedule_from_dict

    out = tiny_pipeline["out"]
    uni = out / "universal"
    saved = schedule_from_dict(read_config(uni / "weights")["schedule"])

    def flops(*argv: str) -> dict:
        assert main(["flops", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    run = flops("--config", str(uni / "config.yaml"))
    assert run["shapes_from"] == f"weights {uni / 'weights'}" and run["schedule"] == saved.describe()
    assert [r["config"] for r in run["rows"]][1:] == [f"sa[{','.join(map(str, c))}]" for c in saved.feasible]
    assert flops("--weights", str(uni / "weights"))["rows"] == run["rows"]
    stage = tmp_path / "stage.yaml"  # a stage config before its run: init_from gives the shapes
    stage.write_text("model:\n  class_path: visor_lightning.lit.Universal\n  init_args:\n"
                     f"    init_from: {out / 'full_finetune' / 'weights'}\n")
    assert flops("--config", str(stage))["rows"] == run["rows"]
    dense = tmp_path / "base.yaml"  # the dense base's rule: every layer SA, whatever the schedule says
    dense.write_text(f"model:\n  class_path: visor_lightning.lit.DenseBase\n  init_args:\n"
                     f"    init_from: {out / 'base' / 'weights'}\n    schedule: {{num_ca: 2}}\n")
    assert flops("--config", str(dense))["schedule"] == "SSSSSS"
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  class_path: visor_lightning.lit.Universal\n  init_args: {lr: 0.001}\n")
    assert main(["flops", "--config", str(bare)]) == 0
    captured = capsys.readouterr()
    assert "using the default shapes" in captured.err and "24 layers x width 896" in captured.out
    gone = tmp_path / "gone.yaml"
    gone.write_text("model:\n  class_path: visor_lightning.lit.Universal\n  init_args: {init_from: /no/such/weights}\n")
    assert main(["flops", "--config", str(gone)]) == 2
    err = capsys.readouterr().err
    assert str(gone) in err and "init_from" in err and "/no/such/weights" in err


def test_eval_does_not_score_an_untrained_router_as_a_policy(tiny_pipeline, tmp_path):
    """Universal weights carry a router no stage has trained: `--configs all` leaves it out with a note, naming it
    labels its row untrained; a policy stage's weights are scored as a policy (visor.json's policy_trained)."""
    from visor_lightning.lit.weights import read_config

    out = tiny_pipeline["out"]
    env = {"VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert read_config(out / "universal" / "weights")["policy_trained"] is False
        assert read_config(out / "router" / "weights")["policy_trained"] is True
        uni = [str(out / "universal" / "config.yaml")]
        doc = run_eval(uni, str(out / "universal" / "weights"), out=str(tmp_path / "all"), swap=False, mlflow=False)
        assert all("policy" not in per for per in doc["results"].values()) and doc["policy_trained"] is False
        assert "not scored: no policy stage has trained" in doc["table"]
        doc = run_eval(uni, str(out / "universal" / "weights"), targets="sa[0],policy", out=str(tmp_path / "named"),
                       swap=False, mlflow=False)
        assert "| policy (untrained router) |" in doc["table"] and "router is untrained" in doc["table"]
        doc = run_eval([str(out / "router" / "config.yaml")], str(out / "router" / "weights"), out=str(tmp_path / "r"),
                       swap=False, mlflow=False)
        assert all("policy" in per for per in doc["results"].values()) and "untrained" not in doc["table"]
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_eval_scores_the_held_out_sets_with_sets_test(tiny_pipeline, tmp_path):
    """`visor eval --sets test` reads the config's data.test (the demo's configs name easy_test/hard_test), logs
    under eval_test/ and writes beside eval/ rather than over it; a config without data.test says what to add."""
    from mlflow import MlflowClient

    from visor_lightning.commands.evaluate import build_parser
    from visor_lightning.controls import read_qa

    out, data = tiny_pipeline["out"], tiny_pipeline["data"]
    env = {"VISOR_DATA": str(data), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert build_parser().parse_args(["--config", "c", "--ckpt", "w", "--sets", "test"]).sets == "test"
        cfg = [str(ROOT / "experiments/debug/stage4_router.yaml")]
        weights = out / "router" / "weights"
        dev = run_eval(cfg, str(weights), targets="sa[0]", swap=False, out=str(tmp_path / "dev"))
        held = run_eval(cfg, str(weights), targets="sa[0]", swap=False, sets="test")
        assert (dev["sets"], held["sets"]) == ("val", "test") and held["out"] == str(out / "router" / "eval_test")
        for s in ("easy", "hard"):
            ids = {split: sorted(r["id"] for r in d["samples"] if r["set"] == s and r["target"] == "sa[0]")
                   for split, d in (("dev", dev), ("test", held))}
            assert ids["test"] and not set(ids["test"]) & set(ids["dev"]), s
            assert len(ids["test"]) == len(list(read_qa(str(data / f"{s}_test-manifest.json"))))
        run = MlflowClient(tiny_pipeline["uri"]).get_run(held["mlflow_run_id"])
        assert "eval_test/hard/acc/sa_0" in run.data.metrics and "eval/hard/acc/sa_0" in run.data.metrics
        bare = tmp_path / "no_test.yaml"
        bare.write_text((ROOT / "experiments/debug/stage4_router.yaml").read_text().replace("\n  test:", "\n  # test:"))
        with pytest.raises(ValueError, match="data.test is not set"):
            run_eval([str(bare)], str(weights), targets="sa[0]", swap=False, sets="test", mlflow=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_eval_of_a_checkpoint_outside_the_store_gets_a_named_tagged_run(tiny_pipeline, tmp_path):
    """Weights whose training run is not in this store: a new run in `visor-eval` named after their stage, tagged
    with the config and checkpoint paths (it was `visor-eval-eval-<commit>` with no tags, for every checkpoint)."""
    import shutil

    from mlflow import MlflowClient

    out = tiny_pipeline["out"]
    store = f"sqlite:///{tmp_path / 'other.db'}"  # a store that has none of the pipeline's runs
    env = {"VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": store}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        weights = tmp_path / "copy" / "weights"
        shutil.copytree(out / "universal" / "weights", weights)
        cfg = str(out / "universal" / "config.yaml")
        ids = [run_eval([cfg], str(weights), targets="sa[0]", swap=False, out=str(tmp_path / s), sets=s)["mlflow_run_id"]
               for s in ("val", "test")]
        runs = [MlflowClient(store).get_run(i) for i in ids]
        assert [r.info.run_name.rsplit("-", 1)[0] for r in runs] == ["visor-eval-universal", "visor-eval-universal-test"]
        for r, s in zip(runs, ("val", "test")):
            tags = r.data.tags
            assert (tags["eval.stage"], tags["eval.sets"]) == ("universal", s)
            assert tags["eval.ckpt"] == str(weights.resolve()) and tags["eval.config"] == str(Path(cfg).resolve())
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_eval_given_a_multi_process_setting_evaluates_in_one_process(tiny_pipeline, tmp_path, capsys):
    """`visor pipeline --stage-args "--trainer.devices 2"` hands its stage args to the in-process evaluation too,
    where Lightning would have started the second rank by running the whole command (the pipeline) again."""
    out = tiny_pipeline["out"]
    env = {"VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": tiny_pipeline["uri"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        doc = run_eval([str(out / "universal" / "config.yaml")], str(out / "universal" / "weights"), targets="sa[0]",
                       out=str(tmp_path / "e"), swap=False, mlflow=False, extra=["--trainer.devices", "2"])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert "evaluates in one process" in capsys.readouterr().out
    assert len([r for r in doc["samples"] if r["set"] == "hard"]) == 16  # every sample once: one process read them all
