"""`visor sizing`: the planning table in docs/scale.md is what the FLOPs model gives today, on the right shapes."""

from __future__ import annotations

from pathlib import Path

import torch

from visor_lightning.commands.sizing import QWEN2, assumptions_markdown, markdown, sizing_rows

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_current():
    doc = (ROOT / "docs/scale.md").read_text()
    block = doc.split("<!-- sizing:start -->\n")[1].split("\n<!-- sizing:end -->")[0]
    expected = markdown(sizing_rows()) + "\n\n" + assumptions_markdown()
    assert block == expected, "docs/scale.md is stale: regenerate its sizing block from `visor sizing`"


def test_shapes_match_the_released_qwen2_models():
    """Parameter counts of the host LLMs without VISOR's CA blocks equal the published Qwen2 sizes."""
    from dataclasses import replace

    from visor_lightning.models import BackboneSpec, LayerSchedule, VisorModel

    published = {"LLaVA-OV 0.5B": 494_032_768, "LLaVA-OV 1.5B": 1_543_714_304, "LLaVA-OV 7B": 7_615_616_512}
    for name, text in QWEN2.items():
        with torch.device("meta"):
            lm = VisorModel(replace(BackboneSpec(), text=text), LayerSchedule.dense(text.num_layers), host=None).lm
        assert sum(p.numel() for p in lm.parameters()) == published[name], name


def test_rows_follow_the_stated_formulas():
    rows = sizing_rows()
    by = {(r.model, r.gpus): r for r in rows}
    for name in QWEN2:
        r8, r64 = by[(name, 8)], by[(name, 64)]
        p = r8.params_b * 1e9
        assert abs(r8.states_gb - (2 * p + 14 * p / 8) / 2**30) < 0.05
        assert abs(r8.compute_s / r64.compute_s - 8) < 1e-9  # compute scales with GPUs at a fixed global batch
        assert r64.states_gb < r8.states_gb and r8.activations_gb == r64.activations_gb
        assert abs(r8.total_gb - r8.states_gb - r8.activations_gb) < 1e-9
