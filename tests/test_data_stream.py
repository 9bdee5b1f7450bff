"""Collation against the model, and streaming: fixed-length training epochs, exact evaluation, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from visor_lightning.data.collate import IGNORE_INDEX, Encoder, collate, image_processor_for
from visor_lightning.data.datamodule import VisorDataModule, resolve_shards
from visor_lightning.data.schema import BadSample, SkipStats, parse_record
from visor_lightning.data.streams import read_samples
from visor_lightning.models import BackboneSpec, LayerSchedule, VisionSpec, VisorModel, tiny_backbone

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("token_pool", [1, 2, 4])
@pytest.mark.parametrize("pinpoints", ["tiny", "llava_ov"])
def test_visual_token_count_matches_the_connector(pinpoints, token_pool):
    """spec.visual_tokens(h, w) (what the collator expands <image> to) equals the model's actual output,
    including LLaVA-OV's 6x6 pinpoints where anyres_max_9 shrinks the tile grid, and VISOR-TR pooling."""
    from PIL import Image

    spec = tiny_backbone()
    if pinpoints == "llava_ov":
        spec = BackboneSpec(text=spec.text, vision=VisionSpec(**{**spec.vision.__dict__, "image_size": 24, "patch_size": 8}),
                            image_token_id=spec.image_token_id)
    spec.token_pool = token_pool
    model = VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=None).eval()
    proc = image_processor_for(spec)
    s = spec.vision.image_size
    sizes = [(s, s), (s, 2 * s), (3 * s, s), (5, 300), (300, 5), (97, 61), (6 * s, 6 * s), (6 * s, 2 * s), (1000, 777)]
    for h, w in sizes:
        enc = proc([Image.new("RGB", (w, h))], return_tensors="pt")
        with torch.no_grad():
            n = model.encode_images(enc["pixel_values"], enc["image_sizes"])[0].shape[0]
        assert n == spec.visual_tokens(h, w), (h, w)


def _encoder(shards, **kw):
    return Encoder(shards.tokenizer, shards.spec, image_processor_for(shards.spec), **kw)


def test_labels_cover_the_answers_only(shards):
    from PIL import Image

    enc = _encoder(shards)
    conv = parse_record({"id": "m", "conversations": [
        {"from": "human", "value": "<image>\nwhat shape is it?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "what colour?"}, {"from": "gpt", "value": "red"}]})
    e = enc(conv, Image.new("RGB", (64, 40)))
    tok = shards.tokenizer
    answer_text = tok.decode(e.input_ids[e.labels != IGNORE_INDEX])
    assert answer_text == "circle<|im_end|>\nred<|im_end|>\n"
    assert int((e.input_ids == shards.spec.image_token_id).sum()) == shards.spec.visual_tokens(40, 64)
    assert (e.labels[e.input_ids == shards.spec.image_token_id] == IGNORE_INDEX).all()
    prompt = tok.decode([t for t in e.prompt_ids.tolist() if t != shards.spec.image_token_id])
    assert prompt.endswith("what colour?<|im_end|>\n<|im_start|>assistant\n") and "red" not in prompt
    assert e.meta["answer"] == "red" and e.pixel_values.shape[1:] == (3, 32, 32)


def test_collated_batch_runs_through_the_model(shards):
    stats = SkipStats()
    examples = list(read_samples(shards.easy_urls[:1] + shards.hard_urls[:1], stats))[:6]
    enc = _encoder(shards)
    batch = collate([enc(ex.conv, ex.image) for ex in examples], pad_id=shards.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["prompt_mask"][:, -1] == 1).all()  # left-padded prompts for generate()
    model = VisorModel(shards.spec, LayerSchedule.build(shards.spec.text.num_layers), host=None)
    out = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    tokens, _ = model.generate(batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"], max_new_tokens=2)
    assert tokens.shape == (6, 2)
    # training's loss_only: the LM head on the answer tokens only, the same loss and gradients (up to rounding)
    params = [model.lm.lm_head.weight, model.lm.norm.weight, model.lm.layers[2].mlp.up_proj.weight]
    grads = torch.autograd.grad(out.loss, params)
    lo = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"],
               labels=batch["labels"], loss_only=True)
    n_answers = int((VisorModel.text_targets(batch["labels"], out.lm.streams.text_idx) != IGNORE_INDEX).sum())
    assert lo.logits is None and lo.lm.logits.shape == (n_answers, shards.spec.text.vocab_size)
    assert n_answers < out.logits.shape[0] * out.logits.shape[1] / 4
    assert torch.allclose(lo.loss, out.loss, rtol=1e-6, atol=0)
    for g, h in zip(grads, torch.autograd.grad(lo.loss, params)):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-7)


def test_padding_to_a_multiple_changes_shapes_not_results(shards):
    """data.pad_to_multiple_of (for model.compile): lengths rounded up, the loss and the answers unchanged."""
    examples = list(read_samples(shards.easy_urls[:1] + shards.hard_urls[:1], SkipStats()))[:6]
    enc = _encoder(shards)
    encoded = [enc(ex.conv, ex.image) for ex in examples]
    plain = collate(encoded, pad_id=shards.tokenizer.pad_token_id)
    padded = collate(encoded, pad_id=shards.tokenizer.pad_token_id, pad_to_multiple_of=16)
    for k in ("input_ids", "prompt_ids"):
        assert padded[k].shape[1] % 16 == 0 and padded[k].shape[1] > plain[k].shape[1], k
    assert padded["attention_mask"].sum() == plain["attention_mask"].sum()
    assert padded["prompt_mask"].sum() == plain["prompt_mask"].sum()
    torch.manual_seed(0)
    model = VisorModel(shards.spec, LayerSchedule.build(shards.spec.text.num_layers), host=None).eval()
    with torch.no_grad():
        losses = [model(b["input_ids"], b["pixel_values"], b["image_sizes"], b["attention_mask"], labels=b["labels"]).loss
                  for b in (plain, padded)]
        answers = [model.generate(b["prompt_ids"], b["pixel_values"], b["image_sizes"], b["prompt_mask"], max_new_tokens=2)[0]
                   for b in (plain, padded)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(answers[1], answers[0])


def test_mismatched_tokenizer_and_too_long(shards):
    with pytest.raises(ValueError, match="<image> id 3 != backbone.image_token_id 511"):
        Encoder(shards.tokenizer, tiny_backbone(vocab_size=512))
    from PIL import Image

    enc = _encoder(shards, max_length=20)
    conv = parse_record({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    with pytest.raises(BadSample, match="too_long"):
        enc(conv, Image.new("RGB", (64, 64)))


def test_resolve_shards_forms(shards):
    root = shards.root
    by_glob = resolve_shards(str(root / "easy-*.tar"))
    assert by_glob == shards.easy_urls == resolve_shards(str(root / "easy-manifest.json"))
    assert resolve_shards(str(root / "easy-{000000..000005}.tar")) == by_glob
    with pytest.raises(FileNotFoundError, match="data.train: no shards match"):
        resolve_shards(str(root / "nope-*.tar"), field="data.train")
    with pytest.raises(FileNotFoundError, match=r"easy-000006.tar. does not exist \(4 of 10 missing\)"):
        resolve_shards(str(root / "easy-{000000..000009}.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epochs_have_fixed_length_and_full_batches(shards, workers):
    dm = VisorDataModule(train=[str(shards.root / "easy-*.tar"), str(shards.root / "hard-*.tar")],
                         tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=3, num_workers=workers,
                         batches_per_epoch=4, shuffle_buffer=8, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[b["id"] for b in loader] for _ in range(2)]
    expected = 4 if workers == 0 else 2 * 2
    assert len(loader) == expected and all(len(e) == expected for e in epochs)
    assert all(len(ids) == 3 for e in epochs for ids in e)
    assert epochs[0] != epochs[1]  # a new epoch draws a new stream
    again = dm.train_dataloader()  # same seed and epoch -> the same stream (reproducible)
    assert [b["id"] for b in again] == epochs[0]


def test_missing_shards_are_named_before_training(shards, tmp_path):
    """A manifest or glob whose shards are gone (moved data, dangling symlinks) fails at setup, naming the shard:
    the resampled training stream would otherwise skip it over and over."""
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(shards.root / "easy-manifest.json", copy)
    for url in shards.easy_urls[1:]:
        shutil.copy(url, copy)
    with pytest.raises(FileNotFoundError, match=r"data.train: shard .*easy-000000.tar. does not exist "
                                                r"\(1 of 6 missing\) \(listed by .*easy-manifest.json\)"):
        resolve_shards(str(copy / "easy-manifest.json"), field="data.train")
    (copy / "easy-000009.tar").symlink_to(tmp_path / "gone.tar")
    with pytest.raises(FileNotFoundError, match=r"easy-000009.tar. does not exist \(1 of 6 missing\)"):
        resolve_shards(str(copy / "easy-*.tar"))


@pytest.mark.parametrize("case,workers,cache", [("unreadable", 0, False), ("unreadable", 2, False), ("too_long", 0, False),
                                                ("unreadable", 0, True), ("too_long", 0, True)])
def test_a_training_stream_with_nothing_to_train_on_raises(shards, tmp_path, case, workers, cache):
    """Resampling never runs dry, so a stream whose shards give no usable sample must say so instead of
    spinning: shards that are not tar files, or samples that all fail to encode (every one too long)."""
    from visor_lightning.data.schema import DataError

    train, kw, match = str(shards.root / "easy-*.tar"), {}, "no training sample of the 6 shard"
    if case == "unreadable":
        for i in range(2):
            (tmp_path / f"bad-{i}.tar").write_bytes(b"not a tar file" * 100)
        train, match = str(tmp_path / "bad-*.tar"), "none of the 2 training shard.s. holds a valid sample"
    else:
        kw = {"max_length": 8}
    dm = VisorDataModule(train=train, tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=2,
                         num_workers=workers, batches_per_epoch=3, encode_cache_dir=str(tmp_path / "enc") if cache else None, **kw)
    dm.setup("fit")
    raised: list[BaseException] = []

    def first_batch() -> None:
        try:
            next(iter(dm.train_dataloader()))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            raised.append(e)

    reader = threading.Thread(target=first_batch, daemon=True)  # a spinning stream must fail the test, not hang it
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), "the training stream is still resampling shards that give nothing"
    assert len(raised) == 1 and isinstance(raised[0], DataError), raised  # re-raised from a worker as well
    assert re.search(match, str(raised[0])), raised[0]
    assert dm.skip_counts()["total"].get("unreadable_shard" if case == "unreadable" else "too_long", 0) >= 2


def test_eval_reads_every_sample_once_across_workers(shards):
    dm = VisorDataModule(val={"easy": str(shards.root / "easy-*.tar"), "hard": str(shards.root / "hard-*.tar")},
                         tokenizer=shards.tokenizer_dir, backbone=shards.spec, batch_size=7, num_workers=2)
    dm.setup("validate")
    easy, hard = dm.val_dataloader()
    ids_easy = [i for b in easy for i in b["id"]]
    ids_hard = [i for b in hard for i in b["id"]]
    assert sorted(ids_easy) == sorted(f"easyvqa-train-{i:06d}" for i in range(60))
    assert sorted(ids_hard) == [f"synthetic-train-{i:07d}" for i in range(60)]
    assert dm.skip_counts()["total"] == {"read": 120}


@pytest.mark.slow
def test_ddp_two_ranks_two_workers(shards, tmp_path):
    """Real Lightning DDP (gloo), 2 ranks x 2 workers: equal training steps per rank, different data per rank,
    and validation sees every sample exactly once across ranks and workers."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/scripts/ddp_data_probe.py"), str(shards.root), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = [len(r["train_ids"]) for r in ranks]
    assert steps == [12, 12]  # 2 epochs x (5 batches -> 3 per worker x 2 workers)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 12
    assert all(len(b) == 4 for r in ranks for b in r["train_ids"])
    assert ranks[0]["train_ids"] != ranks[1]["train_ids"]
    for idx, n in (("0", 60), ("1", 60)):
        seen = ranks[0]["val_ids"].get(idx, []) + ranks[1]["val_ids"].get(idx, [])
        assert len(seen) == len(set(seen)) == n
    # the callback summed the read counters of both ranks (2 val passes x 120 + 2 epochs x 12 steps x 4 x 2 ranks,
    # minus nothing skipped); both ranks agree
    assert ranks[0]["data_stats"] == ranks[1]["data_stats"] and ranks[0]["data_stats"]["data/read"] >= 2 * 120


def test_checkpoint_directory_supplies_tokenizer_and_processor(shards, tmp_path):
    """The real-user path: a LLaVA-OV directory with config, weights, tokenizer and preprocessor_config.json.
    The DataModule takes tokenizer and image processor from ``backbone.pretrained``; the batch runs through
    ``VisorModel.from_llava_onevision`` of the same directory."""
    from conftest import make_host

    ckpt = tmp_path / "llava-ov-tiny"
    make_host(shards.spec).save_pretrained(ckpt)
    shards.tokenizer.save_pretrained(ckpt)
    image_processor_for(shards.spec).save_pretrained(ckpt)
    spec = BackboneSpec.from_pretrained_dir(ckpt)
    dm = VisorDataModule(train=shards.hard_urls, backbone=spec, batch_size=2, num_workers=0, batches_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model, _ = VisorModel.from_llava_onevision(ckpt)
    out = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="data.tokenizer is required"):
        VisorDataModule(train=shards.hard_urls, backbone=tiny_backbone())


def test_skip_counts_reach_mlflow_through_the_logger(shards, tmp_path):
    """DataStats -> Lightning's MLFlowLogger -> a real sqlite MLflow store, read back with MlflowClient."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from visor_lightning.callbacks.data_stats import DataStats

    import tarfile

    bad = tmp_path / "bad-000000.tar"
    good = Path(shards.easy_urls[0]).read_bytes()
    with tarfile.open(shards.easy_urls[0]) as t:
        last = t.getmembers()[-1]
    bad.write_bytes(good[: last.offset_data + last.size // 2])  # cut inside the last member (tar padding aside)

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - batch["pixel_values"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="data-test", tracking_uri=uri)
    dm = VisorDataModule(train=shards.easy_urls[1:3], val={"bad": str(bad)}, tokenizer=shards.tokenizer_dir,
                         backbone=shards.spec, batch_size=2, num_workers=0, batches_per_epoch=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[DataStats()], num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Probe(), datamodule=dm)
    metrics = MlflowClient(uri).get_run(logger.run_id).data.metrics
    assert metrics["data/truncated_shard"] == 1
    assert dm.skip_counts()["val/bad"] == {"truncated_shard": 1, "read": 9}  # the last sample lost its image
    assert metrics["data/read"] == dm.skip_counts()["total"]["read"]  # train reads ahead into the shuffle buffer


@pytest.mark.slow
def test_bench_data_reports_loader_and_training_rates(shards, capsys):
    from visor_lightning.cli import main

    assert main(["bench", "data", "--shards", *shards.easy_urls, "--tokenizer", shards.tokenizer_dir, "--batches", "4",
                 "--batch-size", "2", "--workers", "0,1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)  # --json: stdout is the document alone
    assert [(r["workers"], r["samples"]) for r in res["loader"]] == [(0, "encoded"), (0, "cached"), (1, "encoded"), (1, "cached")]
    assert not any(Path(u).parent.joinpath(".encoded").exists() for u in shards.easy_urls)  # its cache was temporary
    for r in res["loader"]:
        assert r["samples_per_s"] > 0 and r["train_fed_samples_per_s"] > 0
        assert r["loader_over_train"] == pytest.approx(r["samples_per_s"] / res["train_samples_per_s_preloaded"], rel=0.02)
    assert res["visual_tokens_per_sample"] == shards.spec.visual_tokens(64, 64)


def test_a_rank_without_shards_reads_nothing(shards):
    """Fewer eval shards than ranks: the extra rank yields no batches instead of failing."""
    from visor_lightning.data.streams import ShardStream

    dm = VisorDataModule(val={"one": shards.hard_urls[0]}, tokenizer=shards.tokenizer_dir, backbone=shards.spec,
                         batch_size=8, num_workers=0)
    dm.setup("validate")
    stream: ShardStream = dm.val_dataloader()[0].dataset
    seen = []
    for rank in (0, 1):
        stream.rank, stream.world_size = rank, 2
        seen.append([i for b in stream for i in b["id"]])
    assert len(seen[0]) == 20 and seen[1] == []
