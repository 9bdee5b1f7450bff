"""``visor bench data``: is the loader fast enough to keep training fed?

Measured in one run, on the same shards: samples/s of decode + encode + collate at each worker count, the
training step rate of the config's model on pre-loaded batches (the ceiling), and the step rate when the
loader feeds training, each with samples encoded on every read and read from the encoded-sample cache
(``data.encode_cache``, filled first in a temporary directory). Ratios matter; absolute numbers vary with the
machine.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from typing import Any

import torch

from visor_lightning.optim import adamw


def _loader(shards: list[str], tokenizer: str, spec, batch_size: int, batches: int, workers: int,
            cache_dir: str | None = None):
    from visor_lightning.data.datamodule import VisorDataModule

    dm = VisorDataModule(train=shards, tokenizer=tokenizer, backbone=spec, batch_size=batch_size,
                         num_workers=workers, batches_per_epoch=batches + max(1, workers), shuffle_buffer=64,
                         encode_cache_dir=cache_dir)
    dm.setup("fit")
    return dm.train_dataloader()


def _fill_cache(shards: list[str], tokenizer: str, spec, cache_dir: str) -> None:
    """Every shard read to its end once, so the cached rows read encoded samples only."""
    from visor_lightning.data.datamodule import VisorDataModule

    dm = VisorDataModule(val={"all": shards}, tokenizer=tokenizer, backbone=spec, eval_batch_size=64, num_workers=0,
                         encode_cache_dir=cache_dir)
    dm.setup("validate")
    for _ in dm.val_dataloader()[0]:
        pass


def run_bench_data(shards: list[str], tokenizer: str, config: str, batch_size: int, batches: int,
                   workers: list[int]) -> dict[str, Any]:
    from visor_lightning.config import load_model_section
    from visor_lightning.data.datamodule import resolve_shards
    from visor_lightning.data.tokenizer import backbone_for_tokenizer, load_tokenizer
    from visor_lightning.models import VisorModel

    torch.manual_seed(0)
    urls = resolve_shards(shards, field="--shards")
    section = load_model_section(config)
    tok = load_tokenizer(tokenizer)
    spec = section.backbone if section.backbone.pretrained else backbone_for_tokenizer(section.backbone, tok)
    cached = list(itertools.islice(iter(_loader(urls, tokenizer, spec, batch_size, batches, 0)), batches))
    model = VisorModel(spec, section.schedule, policy_width=section.policy_width, host=None)
    opt = adamw(model.parameters(), lr=1e-4)

    def step(b: dict[str, Any]) -> None:
        out = model(b["input_ids"], b["pixel_values"], b["image_sizes"], b["attention_mask"], labels=b["labels"],
                    loss_only=True)  # as the stages train
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step(cached[0])  # warm-up
    t0 = time.perf_counter()
    for b in cached:
        step(b)
    train_sps = len(cached) * batch_size / (time.perf_counter() - t0)

    def rate(w: int, train: bool, cache_dir: str | None) -> tuple[float, float]:
        """(start-up seconds, samples/s) over ``batches`` batches after the first."""
        it = iter(_loader(urls, tokenizer, spec, batch_size, batches, w, cache_dir))
        t0 = time.perf_counter()
        first = next(it)  # start-up: worker processes, first shard, first shuffle buffer
        if train:
            step(first)
        t1 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            if train:
                step(b)
        return t1 - t0, batches * batch_size / (time.perf_counter() - t1)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="visor-bench-cache-") as cache_dir:
        _fill_cache(urls, tokenizer, spec, cache_dir)
        for w, samples in itertools.product(workers, ("encoded", "cached")):
            where = cache_dir if samples == "cached" else None
            startup, sps = rate(w, train=False, cache_dir=where)
            _, fed = rate(w, train=True, cache_dir=where)
            rows.append({"workers": w, "samples": samples, "startup_s": round(startup, 3), "samples_per_s": round(sps, 1),
                         "loader_over_train": round(sps / train_sps, 2), "train_fed_samples_per_s": round(fed, 1),
                         "fed_over_preloaded": round(fed / train_sps, 2)})
    result = {
        "shards": len(urls), "batch_size": batch_size, "batches": batches, "config": config,
        "torch_threads": torch.get_num_threads(),
        "visual_tokens_per_sample": round(float((cached[0]["input_ids"] == spec.image_token_id).sum()) / batch_size, 1),
        "loader": rows, "train_samples_per_s_preloaded": round(train_sps, 1),
    }
    print(f"training ({config}, batch {batch_size}, {result['visual_tokens_per_sample']} visual tokens/sample, "
          f"{torch.get_num_threads()} torch threads): {train_sps:.1f} samples/s on pre-loaded batches")
    print("| loader workers | samples | start-up s | loader samples/s | loader / training | "
          "training fed by the loader, samples/s | fed / pre-loaded |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['samples']} | {r['startup_s']} | {r['samples_per_s']} | {r['loader_over_train']:.2f}x "
              f"| {r['train_fed_samples_per_s']} | {r['fed_over_preloaded']:.2f} |")
    return result
