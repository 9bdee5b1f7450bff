"""Functions of the VISOR demo's lmms-eval tasks (visor_demo_*.yaml): the question as the prompt, the image, and
per-sample scoring with the same answer normalisation as `visor eval`, plus each sample's prefill FLOPs."""

from __future__ import annotations

from typing import Any

from visor_lightning.commands.lmms_eval_adapter import sample_flops
from visor_lightning.lit.metrics import normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """exact_match as `visor eval` scores it; prefill_gflops and the configuration the model ran for this sample."""
    flops = sample_flops(str(doc["id"]))
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"])),
            "prefill_gflops": flops["gflops"], "dense_prefill_gflops": flops["dense_gflops"]}
