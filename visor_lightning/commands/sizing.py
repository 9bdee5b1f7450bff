"""``visor sizing``: step time and GPU memory of VISOR's full fine-tune under DeepSpeed ZeRO-2, from the FLOPs model.

A planning table, not a measurement: every number follows from the assumptions in :data:`ASSUMPTIONS`, which are
printed with it (docs/scale.md holds the generated table; a test fails when it is stale).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from visor_lightning.flops import FlopsModel
from visor_lightning.models import BackboneSpec, LayerSchedule, ScheduleConfig, VisorModel
from visor_lightning.models.spec import TextSpec

GPUS = (8, 16, 32, 64)
ASSUMPTIONS = {
    "stage": "stage 2 full fine-tune of the maximal configuration (|L_CA| = |L_SA| = L/3), vision tower trained",
    "global_batch": 128,
    "image": "one 1024x768 image per sample (AnyRes-9: {visual} visual tokens in {crops} SigLIP crops), 256 text tokens",
    "gpu": "H100 SXM 80 GB: 989 dense bf16 TFLOP/s, 35% model FLOPs utilisation",
    "network": "ZeRO-2 per step: reduce-scatter of bf16 gradients + all-gather of bf16 parameters (2 x 2P bytes "
               "per GPU); 450 GB/s NVLink inside a node of 8, 50 GB/s per GPU (400 Gb/s InfiniBand) across nodes; "
               "added to the compute time as a worst case (DeepSpeed overlaps part of it with backward)",
    "memory": "bf16 parameters (2P) + bf16 gradients and fp32 master/Adam m/v sharded (14P / N) + activations of "
              "one micro-batch sample: 2 bytes x (7d + 2d_kv + 4m) per token per layer (SDPA, no activation "
              "checkpointing) for SigLIP and the LLM layers that see each token",
    "flops": "training = 3 x forward (backward ~ 2 x forward); forward = vision + connector + LLM with the LM head "
             "on every text token",
}
PEAK, MFU, NVLINK, IB = 989e12, 0.35, 450e9, 50e9
TEXT_TOKENS, IMAGE_HW = 256, (768, 1024)

QWEN2 = {  # the LLMs of LLaVA-OneVision 0.5B / 7B and Qwen2-1.5B (config.json of the released checkpoints)
    "LLaVA-OV 0.5B": TextSpec(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                              vocab_size=151936, tie_word_embeddings=True),
    "LLaVA-OV 1.5B": TextSpec(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                              intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "LLaVA-OV 7B": TextSpec(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                            intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass
class Row:
    model: str
    gpus: int
    params_b: float
    tflops_per_sample: float
    compute_s: float
    comm_s: float
    step_s: float
    states_gb: float
    activations_gb: float
    total_gb: float

    @property
    def fits(self) -> str:
        return "yes" if self.total_gb <= 80 else "no"


def _activation_parts(spec: BackboneSpec, schedule: LayerSchedule, nt: int, nv: int, crops: int) -> tuple[float, float]:
    """Bytes the backward keeps for one sample: (the LLM's layers and CA blocks, SigLIP's layers)."""
    t, v = spec.text, spec.vision
    per_tok_lm = 2 * (7 * t.hidden_size + 2 * t.num_kv_heads * t.head_dim + 4 * t.intermediate_size)
    per_tok_vis = 2 * (9 * v.hidden_size + 4 * v.intermediate_size)
    sa = set(schedule.sa_layers)
    lm_tokens = sum(nt + nv if layer in sa else nt for layer in range(t.num_layers))
    lm_tokens += len(schedule.ca_layers) * nt  # CA blocks: text queries (visual K/V are the stored visual tokens)
    return per_tok_lm * lm_tokens, per_tok_vis * v.tokens_per_crop * crops * v.num_layers


def _activation_bytes(spec: BackboneSpec, schedule: LayerSchedule, nt: int, nv: int, crops: int) -> float:
    return sum(_activation_parts(spec, schedule, nt, nv, crops))


def size(name: str, text: TextSpec, gpus: int) -> Row:
    import torch

    spec = replace(BackboneSpec(), text=text)
    third = text.num_layers // 3
    schedule = LayerSchedule.build(text.num_layers, ScheduleConfig(num_ca=third, num_sa=third))
    with torch.device("meta"):  # exact parameter count, no memory
        params = sum(p.numel() for p in VisorModel(spec, schedule, host=None).parameters())
    fm = FlopsModel(spec, schedule)
    nv = spec.visual_tokens(*IMAGE_HW)
    crops = spec.vision_crops(*IMAGE_HW)
    full = schedule.feasible[schedule.full_config]
    forward = fm.vision(crops) + fm.connector(crops, nv) + fm.prefill(full, TEXT_TOKENS, nv, routed=False) \
        + fm.lm_head(TEXT_TOKENS - 1)
    train = 3 * forward
    compute = train * ASSUMPTIONS["global_batch"] / (gpus * PEAK * MFU)
    bandwidth = NVLINK if gpus <= 8 else IB
    comm = 2 * 2 * params * (gpus - 1) / gpus / bandwidth
    states = 2 * params + 14 * params / gpus
    act = _activation_bytes(spec, schedule, TEXT_TOKENS, nv, crops)
    return Row(name, gpus, params / 1e9, train / 1e12, compute, comm, compute + comm, states / 2**30, act / 2**30,
               (states + act) / 2**30)


def sizing_rows() -> list[Row]:
    return [size(name, text, n) for name, text in QWEN2.items() for n in GPUS]


def markdown(rows: list[Row]) -> str:
    head = ("| model | GPUs | params (B) | train TFLOP / sample | compute s / step | ZeRO-2 comm s / step | step s | "
            "model states GB / GPU | activations GB (1 sample) | total GB / GPU | fits 80 GB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.model} | {r.gpus} | {r.params_b:.2f} | {r.tflops_per_sample:.1f} | {r.compute_s:.2f} | "
                     f"{r.comm_s:.2f} | {r.step_s:.2f} | {r.states_gb:.1f} | {r.activations_gb:.1f} | "
                     f"{r.total_gb:.1f} | {r.fits} |")
    return "\n".join(lines)


def assumptions() -> dict[str, str | int]:
    spec = BackboneSpec()
    filled = {"visual": f"{spec.visual_tokens(*IMAGE_HW):,}", "crops": spec.vision_crops(*IMAGE_HW)}
    return {k: v.format(**filled) if isinstance(v, str) else v for k, v in ASSUMPTIONS.items()}


def assumptions_markdown(items: dict[str, Any] | None = None) -> str:
    """``items`` (default: the GPU table's :func:`assumptions`) as a Markdown list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in (assumptions() if items is None else items).items())


# ---- one CPU process (or a few), the setup `visor realsize` measures -------------------------------------------
CPU_ASSUMPTIONS = {
    "runtime": "0.55 GB per process: Python with torch, Lightning, transformers, DeepSpeed and MLflow imported "
               "(ru_maxrss after import on the 2-core machine)",
    "precision": "bf16-mixed on CPU = fp32 parameters under torch.autocast; with DeepSpeed, bf16 parameters and fp32 "
                 "master weights",
    "states": "one process: 4P (fp32 parameters) + 4T (gradients) + 8T (AdamW m, v) + 2T (autocast's bf16 copies of "
              "trained weights, cached over the forward); ZeRO-2 over N ranks, each: 2P (bf16 parameters) + 2T (bf16 "
              "gradients) + (4 + 8)T / N (fp32 master, AdamW m, v) + its reduce and all-gather buckets",
    "activations": "as for the GPU table (2 bytes x (7d + 2d_kv + 4m) per token per LLM layer that sees it; SigLIP's "
                   "only when the vision tower trains), the maximal configuration, plus the logits of every text token "
                   "(fp32, its bf16 copy and its gradient: 10 bytes x vocabulary)",
    "load": "per process: the model built in fp32 (4P) with the checkpoint it starts from read beside it (its file "
            "size: 2P for a released bf16 LLaVA-OV directory, 4P for a stage's fp32 weights)",
    "hand-over": "the weights are written straight from memory (no copy); under ZeRO-2, rank zero first gathers the "
                 "fp32 master shards into one state dict (4P) beside every rank's training state",
}
RUNTIME_BYTES = 0.55 * 2**30


def predict_cpu_stage(weights: str | Path, trainable: int | None, world: int = 1, images: list[tuple[int, int]] = ((384, 384),),
                      text_tokens: int = 64, batch: int = 1, zero2: bool = False, checkpoint_bytes: int | None = None,
                      bucket: int = 200_000_000) -> dict[str, Any]:
    """Peak resident memory of one training stage of the model in ``weights`` (a stage's ``weights/``: its
    ``visor.json`` gives shapes and schedule) on CPU, summed over ``world`` processes (DDP, or DeepSpeed ZeRO-2 with
    ``zero2``), ``batch`` samples of the largest of ``images`` each: the larger of loading and training
    (:data:`CPU_ASSUMPTIONS`). ``trainable``: the stage's trained parameter count; ``checkpoint_bytes``: the size of
    the file the stage starts from (default: fp32 weights, 4P). ``trainable`` None: every parameter trains."""
    import torch

    from visor_lightning.config import load_weights_section

    saved = load_weights_section(weights)  # a missing or foreign directory is named here
    spec, schedule = saved.backbone, saved.schedule
    with torch.device("meta"):
        model = VisorModel(spec, schedule, host=None, policy_width=saved.policy_width)
    params = sum(p.numel() for p in model.parameters())
    trainable = params if trainable is None else trainable  # a full fine-tune
    vision_params = sum(p.numel() for p in model.vision.parameters())
    # what the backward needs saved: the LLM's activations when anything but the router trains (the loss reaches
    # CA blocks through the LLM), SigLIP's when the vision tower trains (more than its size trains)
    lm_trains = trainable > sum(p.numel() for p in model.policy.parameters())
    vision_trains = trainable > vision_params
    act = 0.0
    for h, w in images:  # the maximal configuration: every SA candidate sees the visual tokens
        nv, crops = spec.visual_tokens(h, w), spec.vision_crops(h, w)
        lm, vis = _activation_parts(spec, schedule, text_tokens, nv, crops)
        act = max(act, lm * lm_trains + vis * vision_trains)
    act *= batch
    logits = 10 * spec.text.vocab_size * text_tokens * batch * lm_trains
    if not zero2:
        states = 4 * params + (4 + 8 + 2) * trainable
    else:
        states = 2 * params + 2 * trainable + 12 * trainable / world + 2 * 2 * min(bucket, trainable)
    load = 4 * params + (4 * params if checkpoint_bytes is None else checkpoint_bytes)
    train = world * (RUNTIME_BYTES + states + act + logits)  # each rank: its own micro-batch
    if zero2:  # rank zero gathers every rank's fp32 master shard into one state dict for the hand-over weights
        train += 4 * params
    total = max(world * (RUNTIME_BYTES + load), train)
    return {"params": params, "trainable": trainable, "world": world, "zero2": zero2, "states_gb": states / 2**30,
            "activations_gb": (act + logits) / 2**30, "load_gb": world * (RUNTIME_BYTES + load) / 2**30,
            "train_gb": train / 2**30, "total_gb": total / 2**30}
