"""`visor realsize`'s parts at tiny width: the random checkpoint directory loads as the released one would, the
parquet fixture builds into shards whose images AnyRes tiles differently, and the runner's measurements.

The run itself (0.9B parameters, about 15 minutes) is `make realsize`; its output is recorded in docs/scale.md."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from visor_lightning.commands.realsize import PeakRSS, step_seconds
from visor_lightning.commands.realsize_fixtures import (FIXTURE_SIZES, QWEN2_REGULAR, SPECIALS, write_parquet_fixture,
                                                        write_random_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
# the files of llava-hf/llava-onevision-qwen2-0.5b-ov-hf (chat_template.jinja: transformers 5's tokenizer template)
RELEASED_FILES = {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                  "processor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "added_tokens.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The 0.5B model.yaml with narrow, shallow shapes; Qwen2's vocabulary, token ids and 384-px crops kept."""
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("realsize")
    cfg = OmegaConf.load(ROOT / "experiments/llava_ov_0.5b/model.yaml")
    cfg.model.backbone.text.update(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)
    cfg.model.backbone.vision.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.model.schedule = {"num_ca": 1, "num_sa": 1}
    OmegaConf.save(cfg, tmp / "model.yaml")
    info = write_random_checkpoint(tmp / "model.yaml", tmp / "ckpt", dtype="float32")
    assert info["params"] > 151936 * 32  # the full vocabulary is there
    return tmp / "ckpt"


def test_random_checkpoint_has_the_released_layout_and_token_ids(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} >= RELEASED_FILES
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision" and cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert (cfg["image_token_index"], cfg["video_token_index"]) == (151646, 151647)
    assert (cfg["vision_aspect_ratio"], cfg["vision_feature_select_strategy"], cfg["vision_feature_layer"]) == \
        ("anyres_max_9", "full", -1)
    assert len(cfg["image_grid_pinpoints"]) == 36 and cfg["text_config"]["vocab_size"] == 151936
    from visor_lightning.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    assert tok.convert_tokens_to_ids(SPECIALS) == [151643, 151644, 151645, 151646, 151647]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tok.encode("<|im_start|>user\n<image>\nWhat is the size of this image?<|im_end|>")
    assert ids[0] == 151644 and 151646 in ids and ids[-1] == 151645 and max(i for i in ids if i < QWEN2_REGULAR) < 1024
    assert json.loads((tiny_dir / "added_tokens.json").read_text())["<image>"] == 151646
    assert json.loads((tiny_dir / "processor_config.json").read_text())["num_image_tokens"] == 729


def test_random_checkpoint_loads_like_a_downloaded_one(tiny_dir):
    from visor_lightning.data.collate import image_processor_for
    from visor_lightning.models import BackboneSpec, ScheduleConfig, VisorModel

    model, report = VisorModel.from_llava_onevision(tiny_dir, ScheduleConfig(num_ca=1, num_sa=1))
    assert report.loaded > 0 and not report.unexpected_in_checkpoint
    spec = BackboneSpec.from_pretrained_dir(tiny_dir)
    proc = image_processor_for(spec, tiny_dir)  # the directory's own preprocessor_config.json
    assert proc.size["height"] == 384 and [list(p) for p in proc.image_grid_pinpoints] == spec.pinpoints()


def test_parquet_fixture_builds_shards_whose_photographs_anyres_tiles_differently(tmp_path, tiny_dir):
    from visor_lightning.cli import main
    from visor_lightning.models import BackboneSpec
    from transformers.image_processing_utils import select_best_resolution

    info = write_parquet_fixture(tmp_path / "pq", rows=6, files=2)
    assert len(info["files"]) == 2
    assert main(["data", "build", "--source", "hf-parquet", "--parquet", str(tmp_path / "pq" / "**" / "*.parquet"),
                 "--out", str(tmp_path / "shards"), "--split", "train", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "shards" / "train-manifest.json").read_text())
    assert manifest["written"] == 6 and not manifest["skipped"]
    spec = BackboneSpec.from_pretrained_dir(tiny_dir)
    grids = {tuple(x // 384 for x in select_best_resolution(hw, spec.pinpoints())) for hw in FIXTURE_SIZES}
    assert len(grids) >= 4, grids  # 1x1, 1x2, 2x1, 2x2
    import webdataset as wds
    from PIL import Image
    import io

    sizes = set()
    for sample in wds.WebDataset(str(tmp_path / "shards" / "train-000000.tar"), shardshuffle=False):
        img = next(v for k, v in sample.items() if k.endswith(("jpg", "jpeg", "png")))
        sizes.add(Image.open(io.BytesIO(img)).size[::-1])
        conv = json.loads(sample["json"])["conversations"]
        assert len(conv) >= 4 and conv[0]["value"].startswith("<image>")  # multi-turn, image first
    assert sizes <= set(FIXTURE_SIZES) and len(sizes) >= 3


def test_peak_rss_follows_the_process_tree(tmp_path):
    """A grandchild's 300 MB counts: DDP and DeepSpeed ranks are children of the stage's process."""
    inner = "import torch, time; x = torch.ones(300 * 2**20 // 4); time.sleep(3)"
    outer = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}])"
    proc = subprocess.Popen([sys.executable, "-c", outer])
    mem = PeakRSS(proc.pid, every=0.1)
    proc.wait()
    assert mem.stop() > 300 * 2**20


def test_step_seconds_from_progress_lines():
    text = textwrap.dedent("""\
        [full_finetune] step 1/3 | loss 11.9 | 0.0 samples/s | elapsed 0:00:41 | ETA 0:00:41
        noise
        [full_finetune] step 2/3 | loss 11.1 | 0.0 samples/s | elapsed 0:01:07 | ETA 0:00:00
        [full_finetune] step 3/3 | loss 11.1 | 0.0 samples/s | elapsed 1:00:07 | ETA 0:00:00""")
    assert step_seconds(text) == [41, 26, 3540]


def test_cpu_sizing_counts_states_by_what_trains(tiny_dir, tmp_path):
    """One process: fp32 parameters + gradients, AdamW moments and autocast copies of the trained ones; the
    load (checkpoint beside the model) when that is larger; ZeRO-2 ranks hold bf16 parameters."""
    from visor_lightning.commands.sizing import RUNTIME_BYTES, predict_cpu_stage
    from visor_lightning.lit.weights import save_weights
    from visor_lightning.models import ScheduleConfig, VisorModel

    model, _ = VisorModel.from_llava_onevision(tiny_dir, ScheduleConfig(num_ca=1, num_sa=1))
    save_weights(model, tmp_path / "w")
    P = sum(p.numel() for p in model.parameters())
    full = predict_cpu_stage(tmp_path / "w", trainable=P, images=[(288, 384)], text_tokens=50)
    assert full["params"] == P and full["states_gb"] * 2**30 == pytest.approx(18 * P)
    assert full["activations_gb"] > 0
    router = predict_cpu_stage(tmp_path / "w", trainable=sum(p.numel() for p in model.policy.parameters()))
    assert router["activations_gb"] == 0 and router["total_gb"] * 2**30 == pytest.approx(RUNTIME_BYTES + 8 * P)
    zero = predict_cpu_stage(tmp_path / "w", trainable=P, world=2, zero2=True, images=[(288, 384)], text_tokens=50)
    assert zero["states_gb"] * 2**30 == pytest.approx(2 * P + 2 * P + 6 * P + 4 * P)  # bf16 params + grads, half the rest
    R, G = RUNTIME_BYTES, 2**30  # loading on each rank, or training on each + rank zero gathering the fp32 weights
    assert zero["total_gb"] * G == pytest.approx(max(2 * (R + 8 * P), 2 * (R + (zero["states_gb"] + zero["activations_gb"]) * G) + 4 * P))
    bf16_start = predict_cpu_stage(tmp_path / "w", trainable=0, checkpoint_bytes=2 * P)  # a released 16-bit directory
    assert bf16_start["load_gb"] * G == pytest.approx(R + 6 * P)


def test_visor_sizing_describes_a_cpu_stage(tiny_dir, tmp_path, capsys):
    """`visor sizing --weights`: the same prediction from the command line, every parameter trained by default."""
    from visor_lightning.cli import main
    from visor_lightning.commands.sizing import predict_cpu_stage
    from visor_lightning.lit.weights import save_weights
    from visor_lightning.models import ScheduleConfig, VisorModel

    model, _ = VisorModel.from_llava_onevision(tiny_dir, ScheduleConfig(num_ca=1, num_sa=1))
    save_weights(model, tmp_path / "w")
    assert main(["sizing", "--weights", str(tmp_path / "w"), "--world", "2", "--zero2", "--image", "640x320", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["prediction"]
    assert got == predict_cpu_stage(tmp_path / "w", None, world=2, zero2=True, images=[(640, 320)])
    assert got["trainable"] == got["params"] == sum(p.numel() for p in model.parameters())
    assert main(["sizing", "--weights", str(tmp_path)]) == 2
    assert "no visor.json there" in capsys.readouterr().err


@pytest.mark.slow
def test_the_runner_end_to_end_at_tiny_width(tmp_path, monkeypatch):
    """`visor realsize` as the real run takes it, on a 3-layer model with Qwen2's vocabulary: the CA stage under
    ZeRO-2 over 2 processes, the full fine-tune killed (SIGKILL, every rank) after its step-1 checkpoint and resumed
    from it, the universal and policy stages, `visor eval` on the 8 dev samples, the checkpoints deleted."""
    from omegaconf import OmegaConf

    from visor_lightning.commands.realsize import realsize_main

    cfg = OmegaConf.load(ROOT / "experiments/llava_ov_0.5b/model.yaml")
    cfg.model.backbone.text.update(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)
    cfg.model.backbone.vision.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.model.schedule = {"num_ca": 1, "num_sa": 2}
    OmegaConf.save(cfg, tmp_path / "model.yaml")
    monkeypatch.chdir(ROOT)
    for var in ("VISOR_DATA", "VISOR_OUT", "VISOR_LLAVA_OV", "VISOR_RUNS_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "rs"
    code = realsize_main(["--out", str(out), "--model-config", str(tmp_path / "model.yaml"),
                          "--schedule", '{"num_ca": 1, "num_sa": 2, "feasible": "counts"}', "--json"])
    report = json.loads((out / "realsize.json").read_text())
    assert code == 0 and report["ok"], (out / "realsize.log").read_text()[-4000:]
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["stage1_ca", "stage2_sft", "universal", "policy"]
    assert rows["stage1_ca"]["world"] == 2 and rows["stage1_ca"]["zero2"]
    assert all(r["global_step"] == 2 and len(r["step_seconds"]) == 2 for r in rows.values())
    resume = rows["stage2_sft"]["resume"]
    assert resume["killed"] and resume["resumed_from"].endswith(("step=1.ckpt", "last.ckpt"))
    assert resume["steps_before_kill"] == resume["steps_after"] == 1  # killed after step 1; step 2 only after resume
    trained = {k: r["trainable_params"] for k, r in rows.items()}  # CA blocks + conv; all; all; the router
    assert trained["stage2_sft"] == trained["universal"] > trained["stage1_ca"] + trained["policy"]
    assert all(r["checkpoint_gb"] > 0 and r["predicted_gb"] > 0 for r in rows.values())
    assert report["eval"]["rc"] == 0 and set(report["eval"]["samples"].values()) == {8}
    assert not list((out / "runs").rglob("*.ckpt"))  # weights gone too, the random checkpoint (reused) stays
    assert [p.parent.name for p in out.rglob("model.safetensors")] == ["llava-onevision-qwen2-0.5b-ov-random"]
    assert list((out / "mlartifacts").rglob("*.png"))  # MLflow's artifacts beside its store; the weights' copies gone
    assert "| stage2_sft | 1 |" in (out / "realsize.md").read_text()
