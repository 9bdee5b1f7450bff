"""Stage semantics on the tiny model: what trains, which configuration runs, the budget, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from visor_lightning.data.datamodule import VisorDataModule
from visor_lightning.lit import CAPretrain, PolicyTraining, Universal
from visor_lightning.models import BackboneSpec, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]


def _data(d: Path, **kw) -> VisorDataModule:
    return VisorDataModule(train=[str(d / "easy_train-manifest.json"), str(d / "hard_train-manifest.json")],
                           val={"easy": str(d / "easy_dev-manifest.json"), "hard": str(d / "hard_dev-manifest.json")},
                           tokenizer=str(d / "tokenizer"), **{"batch_size": 4, "num_workers": 0, "batches_per_epoch": 2, **kw})


def _trainer(tmp_path, steps: int, **kw) -> pl.Trainer:
    kw = {"limit_val_batches": 0, **kw}
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, **kw)


@pytest.mark.slow
def test_stage1_trains_only_ca_and_conv(tiny_pipeline, tmp_path):
    hf = tiny_pipeline["out"] / "base" / "hf"
    module = CAPretrain(backbone=BackboneSpec(pretrained=str(hf)), schedule=ScheduleConfig(num_ca=2, num_sa=3, feasible="all"),
                        policy_width=32, lr=1e-2)
    by_part = module.trainable_by_part()
    assert by_part["ca"] > 0 and by_part["cpe"] > 0 and by_part["vision"] == by_part["lm"] == by_part["connector"] == 0
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _trainer(tmp_path, 2).fit(module, datamodule=_data(tiny_pipeline["data"]))
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("lm.ca_blocks.", "connector.cpe.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("lm.ca_blocks.") for k in changed) and any(k.startswith("connector.cpe.") for k in changed)
    with pytest.raises(ValueError, match="trains only ca and cpe"):
        CAPretrain(backbone=BackboneSpec(pretrained=str(hf)), schedule=ScheduleConfig(num_ca=2, num_sa=3), train_parts=["ca", "lm"])


@pytest.mark.slow
def test_universal_step_runs_the_sampled_configuration(tiny_pipeline):
    module = Universal(init_from=str(tiny_pipeline["out"] / "full_finetune" / "weights"), search=False, seed=3)
    dm = _data(tiny_pipeline["data"])
    dm.backbone = module.spec
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    sch = module.schedule
    seen = set()
    for step in range(12):
        ids = module.config_for_step(step, batch["input_ids"].shape[0])
        seen.add(int(ids[0]))
        out = module.forward_batch(batch, ids)
        active = set(sch.feasible[int(ids[0])])
        sa_calls = {int(k.split(":")[0]) for k in out.lm.layer_calls if k.endswith(":sa")}
        assert sa_calls == active, (step, sch.names[int(ids[0])], out.lm.layer_calls)
        assert {int(k.split(":")[0]) for k in out.lm.layer_calls if k.endswith(":text")} == set(range(6)) - active
    assert len(seen) > 1  # different steps draw different configurations
    module.training_step(batch, 0)  # global_step 0 outside a Trainer: the step-0 draw
    active = set(sch.feasible[int(module.config_for_step(0, 1)[0])])
    assert {int(k.split(":")[0]) for k in module.last_layer_calls if k.endswith(":sa")} == active


@pytest.mark.slow
def test_budget_policy_lands_near_its_target(shards, tmp_path):
    """Held-out (validation) mean prefill cost of the policy's choices within 10% of 1/target_savings.

    On easy-vqa and the document tasks prompts differ in length, so samples differ in cost and a mix of choices can
    meet a target between two configurations' costs. (On the demo's 32-px scenes every sample costs the same per
    configuration.)"""
    schedule = ScheduleConfig(num_ca=2, num_sa=3, feasible="all")
    dm = VisorDataModule(train=shards.easy_urls[:4] + shards.hard_urls[:2],
                         val={"easy": shards.easy_urls[4:], "hard": shards.hard_urls[2:]},
                         tokenizer=shards.tokenizer_dir, batch_size=4, num_workers=0, batches_per_epoch=60)
    probe = PolicyTraining(backbone=shards.spec, schedule=schedule, policy_width=32, objective="budget", target_savings=2.0)
    dm.backbone = probe.spec
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    # a target between the cheapest and the dearest configuration: no single fixed choice is near it by luck
    _, _, _, cost = probe.per_config(batch)
    lo, hi = float(cost.mean(0).min()), float(cost.mean(0).max())
    target_cost = (lo + hi) / 2
    module = PolicyTraining(backbone=shards.spec, schedule=schedule, policy_width=32, objective="budget",
                            target_savings=1 / target_cost, budget_weight=20.0, lr=3e-2, eval_configs="full")
    trainer = _trainer(tmp_path, 60, limit_val_batches=1.0)
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm)
    costs = [1 / module.eval_results[s]["policy"]["saving"] for s in module.eval_results]
    held_out = sum(costs) / len(costs)
    assert abs(held_out - target_cost) / target_cost <= 0.10, (held_out, target_cost, lo, hi, module.eval_results)


@pytest.mark.slow
def test_sigkill_then_resume_finishes_in_the_same_mlflow_run(tiny_pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "VISOR_DATA": str(tiny_pipeline["data"]), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    root = tmp_path / "run"
    args = [sys.executable, "-m", "visor_lightning", "fit", "--config", str(ROOT / "experiments/debug/stage2_full.yaml"),
            "--model.init_args.init_from", str(tiny_pipeline["out"] / "ca_pretrain" / "weights"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "40", "--data.batches_per_epoch", "40",
            "--data.batch_size", "2", "--global_batch_size", "2", "--data.num_workers", "0",
            "--checkpoint_every_n_steps", "5", "--trainer.log_every_n_steps", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = root / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.startswith("step=1") for p in ckpts.glob("step=*.ckpt")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "weights").exists()  # it really died before finishing
    killed_at = max(int(p.stem.split("=")[1]) for p in ckpts.glob("step=*.ckpt"))
    run_id = (root / "mlflow_run_id").read_text()
    assert 10 <= killed_at < 40
    done = subprocess.run(args + ["--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((root / "weights" / "visor.json").read_text())["global_step"] == 40
    assert (root / "mlflow_run_id").read_text() == run_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps[0] < killed_at and steps[-1] >= 38  # one run: logged before the kill and after the resume
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_universal_stage_trains_under_ddp_with_two_ranks(tiny_pipeline, tmp_path):
    """`visor fit` with experiments/base/ddp.yaml, 2 gloo ranks: skipped layers leave unused parameters, and
    validation shards split unevenly (1 shard per set, 2 ranks) without a deadlock."""
    d = tiny_pipeline["data"]
    env = {**os.environ, "VISOR_DATA": str(d), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1"}
    root = tmp_path / "run"
    args = [sys.executable, "-m", "visor_lightning", "fit", "--config", str(ROOT / "experiments/debug/stage3_universal.yaml"),
            "--config", str(ROOT / "experiments/base/ddp.yaml"), "--trainer.devices", "2",
            "--model.init_args.init_from", str(tiny_pipeline["out"] / "full_finetune" / "weights"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4", "--data.batches_per_epoch", "4",
            "--data.batch_size", "2", "--global_batch_size", "4", "--data.num_workers", "1",
            "--data.val.easy", str(d / "easy_dev-000000.tar"), "--data.val.hard", str(d / "hard_dev-000000.tar"),
            "--trainer.log_every_n_steps", "2"]  # steps that log (their loss averaged over ranks) and steps that do not
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr + done.stdout
    meta = json.loads((root / "weights" / "visor.json").read_text())
    assert meta["global_step"] == 4  # accumulation 4 / (2 x 2 ranks) = 1
    from mlflow import MlflowClient

    client, run_id = MlflowClient(env["MLFLOW_TRACKING_URI"]), (root / "mlflow_run_id").read_text().strip()
    for key in ("train/loss", "train/gflops_per_sample"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 3], key
    results = json.loads((root / "eval.json").read_text())["results"]
    assert set(results) == {"easy", "hard"} and len(results["easy"]) == len(meta["schedule"]["feasible"])


def test_init_from_wins_over_a_backbone_and_says_so(tiny_pipeline):
    from visor_lightning.lit import FullFinetune
    from visor_lightning.models import tiny_backbone

    weights = tiny_pipeline["out"] / "ca_pretrain" / "weights"
    with pytest.warns(UserWarning, match="model.backbone is ignored"):
        module = FullFinetune(init_from=str(weights), backbone=tiny_backbone(vocab_size=1024))
    assert module.spec.text.vocab_size == json.loads((weights / "visor.json").read_text())["backbone"]["text"]["vocab_size"]
