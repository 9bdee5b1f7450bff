"""Shared fixtures: tiny LLaVA-OneVision-shaped models built with transformers (nothing is downloaded)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# device profiles a test measures go to a throw-away folder, not the user's cache
os.environ["VISOR_PROFILE_DIR"] = __import__("tempfile").mkdtemp(prefix="visor-profiles-")

import time
import urllib.request
from pathlib import Path

import pytest
import torch

from visor_lightning.models import LayerSchedule, ScheduleConfig, VisorModel, left_pad, tiny_backbone

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def make_host(spec, seed: int = 0):
    """A random transformers LlavaOnevisionForConditionalGeneration with the given shapes (sdpa, eval)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = spec.to_hf_config()
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def wake_new_weights(model: VisorModel, seed: int = 1) -> VisorModel:
    """Give CA gates, CA projections and the positional conv non-zero values, so the visual path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in model.new_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gate" in name else 0.1) + (0.5 if "gate" in name else 0.0))
    return model


def image_batch(model: VisorModel, sizes: list[tuple[int, int]], seed: int = 0):
    """Random AnyRes pixel crops for images of the given (height, width) and their visual-token counts."""
    g = torch.Generator().manual_seed(seed)
    spec = model.backbone
    crops = [model.connector.num_crops(hw) for hw in sizes]
    s = spec.vision.image_size
    pixels = torch.randn(len(sizes), max(crops), 3, s, s, generator=g)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        n_vis = [v.shape[0] for v in model.encode_images(pixels, image_sizes)]
    return pixels, image_sizes, n_vis


def prompt_batch(model: VisorModel, n_vis: list[int], before: list[int], after: list[int], seed: int = 0):
    """Left-padded [text_before, <image> x n_vis, text_after] rows -> (input_ids, attention_mask, unpadded rows)."""
    g = torch.Generator().manual_seed(seed)
    img = model.image_token_id
    rows = [
        torch.cat([torch.randint(0, img, (a,), generator=g), torch.full((v,), img), torch.randint(0, img, (b,), generator=g)])
        for v, a, b in zip(n_vis, before, after)
    ]
    ids, mask = left_pad(rows)
    return ids, mask, rows


@pytest.fixture(scope="session")
def spec():
    return tiny_backbone()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, spec):
    """A tiny random LLaVA-OneVision saved with save_pretrained, as a user's downloaded checkpoint would be."""
    path = tmp_path_factory.mktemp("llava_ov_tiny")
    make_host(spec, seed=3).save_pretrained(path)
    return path


@pytest.fixture()
def visor_model(spec):
    """Tiny VISOR model (default schedule: SA 0,3 with 0 always on; CA 1,4) with woken-up new weights."""
    model = VisorModel(spec, ScheduleConfig(), host=make_host(spec)).eval()
    return wake_new_weights(model)


@pytest.fixture()
def dense_pair(spec):
    host = make_host(spec)
    return host, VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=host).eval()


# ---- data: real shards built once per session -------------------------------------------------------------
class DemoShards:
    """easy-vqa (6 shards x 10) and synthetic (3 x 20) training shards plus a tokenizer trained on them."""

    def __init__(self, root) -> None:
        from visor_lightning.data.shards import build_shards, split_urls
        from visor_lightning.data.sources import easy_vqa_items, synthetic_items
        from visor_lightning.data.synthetic import SyntheticConfig
        from visor_lightning.data.tokenizer import backbone_for_tokenizer, conversation_texts, train_tokenizer

        self.root = root
        total, items = easy_vqa_items("train")
        self.easy = build_shards(items, root, "easy", total=total, shard_size=10, max_samples=60, progress=False)
        total, items = synthetic_items("train", 0, 60, SyntheticConfig(image_size=96))
        self.hard = build_shards(items, root, "hard", total=total, shard_size=20, progress=False)
        self.easy_urls, self.hard_urls = split_urls(root, "easy"), split_urls(root, "hard")
        self.tokenizer_dir = str(root / "tokenizer")
        self.tokenizer = train_tokenizer(conversation_texts(self.easy_urls + self.hard_urls), self.tokenizer_dir, 400)
        self.spec = backbone_for_tokenizer(tiny_backbone(), self.tokenizer)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> DemoShards:
    return DemoShards(tmp_path_factory.mktemp("shards"))


# ---- the demo's splits at test size, and the debug pipeline run once on them ---------------------------------
TINY_STEPS = ("--trainer.max_steps 2 --data.batches_per_epoch 2 --global_batch_size 4 --data.batch_size 4 "
              "--trainer.log_every_n_steps 1")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's splits (same names as runs/demo/data) at test size, built by the pipeline's own builder."""
    from visor_lightning.commands.pipeline import build_data

    out = tmp_path_factory.mktemp("demo_data")
    build_data({
        "dir": str(out),
        "builds": [
            {"source": "synthetic", "split": "easy_train", "tasks": "shape", "max_samples": 64, "shard_size": 16,
             "image_size": 32, "turns": 2, "seed": 1},
            {"source": "synthetic", "split": "hard_train", "tasks": "tally,locate,beside", "max_samples": 64,
             "shard_size": 16, "image_size": 32, "turns": 3, "seed": 1},
            {"source": "synthetic", "split": "easy_dev", "tasks": "shape", "max_samples": 16, "shard_size": 8,
             "image_size": 32, "seed": 2, "exclude_images_of": "easy_train"},
            {"source": "synthetic", "split": "hard_dev", "tasks": "tally,locate,beside", "max_samples": 16,
             "shard_size": 8, "image_size": 32, "seed": 2, "exclude_images_of": "hard_train"},
            {"source": "synthetic", "split": "easy_test", "tasks": "shape", "max_samples": 16, "shard_size": 8,
             "image_size": 32, "seed": 3, "exclude_images_of": "easy_train"},
            {"source": "synthetic", "split": "hard_test", "tasks": "tally,locate,beside", "max_samples": 16,
             "shard_size": 8, "image_size": 32, "seed": 3, "exclude_images_of": "hard_train"},
        ],
        "tokenizer": {"vocab_size": 512, "splits": ["easy_train", "hard_train"]},
    }, restart=True)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(demo_data, tmp_path_factory) -> dict:
    """experiments/debug/pipeline.yaml end to end at a few steps per stage, into a fresh MLflow store."""
    out = tmp_path_factory.mktemp("pipeline")
    from visor_lightning.commands.pipeline import load_pipeline, run_pipeline

    env = {"VISOR_DATA": str(demo_data), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_pipeline(ROOT / "experiments/debug/pipeline.yaml")  # resolves ${oc.env:VISOR_DATA} here
        cfg["out"] = str(out)
        cfg["experiment"] = "visor-test"
        cfg.pop("data")  # built above (the builder itself is what demo_data used)
        # two steps per stage leave the search's scores at noise level: keep every candidate, so the tests below see
        # the same four configurations whatever the noise (the search still runs and reports its scores)
        for st in cfg["stages"]:
            st.pop("fit_args", None)  # 2-process DDP would not divide TINY_STEPS' batch of 4 (the demo test runs it)
            if st["name"] == "universal":
                st["args"] = {**(st.get("args") or {}), "model.init_args.tolerance": 0}
        t = time.perf_counter()
        assert run_pipeline(cfg, extra=TINY_STEPS.split()) == 0
        seconds = time.perf_counter() - t
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return {"out": out, "uri": env["MLFLOW_TRACKING_URI"], "seconds": seconds, "data": demo_data}




@contextlib.contextmanager
def visor_ui(argv: list[str], env: dict | None = None, timeout: float = 90):
    """``visor ui`` (``argv``, plus a free ``--port``) started in its own session and answering ``/health``; yields its
    base URL and stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*argv, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            assert time.time() < deadline, "visor ui did not come up"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
