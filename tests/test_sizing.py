"""`visor sizing`: the planning table in docs/scale.md is what the FLOPs model gives today, on the right shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_one_row_by_hand():
    """LLaVA-OV 0.5B on 8 GPUs, every column from the stated assumptions with the shapes written out: Qwen2-0.5B
    (d 896, 2 KV heads of 64, MLP 4864, 24 layers: 8 CA and 8 SA in the maximal configuration), SigLIP (d 1152,
    MLP 4304, 26 layers, 729 tokens a crop), one 1024x768 image = 7 crops and 4,725 visual tokens, 256 text tokens."""
    from dataclasses import replace

    from visor_lightning.flops import FlopsModel
    from visor_lightning.models import BackboneSpec, LayerSchedule, ScheduleConfig

    r = next(x for x in sizing_rows() if x.model == "LLaVA-OV 0.5B" and x.gpus == 8)
    spec = replace(BackboneSpec(), text=QWEN2["LLaVA-OV 0.5B"])
    assert (spec.visual_tokens(768, 1024), spec.vision_crops(768, 1024)) == (4725, 7)
    nt, nv, crops = 256, 4725, 7
    lm_tokens = 8 * (nt + nv) + 16 * nt + 8 * nt  # SA layers see every token, the others and the CA blocks the text
    act = 2 * (7 * 896 + 2 * 128 + 4 * 4864) * lm_tokens + 2 * (9 * 1152 + 4 * 4304) * 729 * crops * 26
    assert r.activations_gb == act / 2**30
    p = r.params_b * 1e9
    assert r.comm_s == 2 * 2 * p * 7 / 8 / 450e9  # reduce-scatter + all-gather of bf16, NVLink inside one node
    sch = LayerSchedule.build(24, ScheduleConfig(num_ca=8, num_sa=8))
    fm = FlopsModel(spec, sch)
    forward = fm.vision(crops) + fm.connector(crops, nv) + fm.prefill(sch.feasible[sch.full_config], nt, nv, routed=False) \
        + fm.lm_head(nt - 1)
    assert r.compute_s == pytest.approx(3 * forward * 128 / (8 * 989e12 * 0.35), rel=1e-12)
    assert r.step_s == r.compute_s + r.comm_s and 9.0 < r.activations_gb < 9.1
