"""Hand-over between stages: weights (not optimizer state) as safetensors plus ``visor.json``.

``visor.json`` records the backbone shapes, the resolved layer schedule (including a feasible set found by the
universal stage) and the policy width, so the next stage rebuilds exactly this model. ``export_llava_onevision``
writes a from-scratch dense base as a transformers LLaVA-OneVision directory, so VISOR is applied to it exactly
as to a downloaded checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from visor_lightning.models import BackboneSpec, LayerSchedule, VisorModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "visor.json"


def schedule_to_dict(s: LayerSchedule) -> dict[str, Any]:
    return {"num_layers": s.num_layers, "ca_layers": list(s.ca_layers), "sa_layers": list(s.sa_layers),
            "always_on_sa": list(s.always_on_sa), "feasible": [list(c) for c in s.feasible]}


def schedule_from_dict(d: dict[str, Any]) -> LayerSchedule:
    return LayerSchedule(d["num_layers"], tuple(d["ca_layers"]), tuple(d["sa_layers"]), tuple(d["always_on_sa"]),
                         tuple(tuple(c) for c in d["feasible"]))


def save_weights(model: VisorModel, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``out/model.safetensors`` (fp32, shared tensors handled) + ``out/visor.json``."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_model = model
    if next(model.parameters()).dtype != torch.float32:
        import copy

        state_model = copy.deepcopy(model).float()
    save_model(state_model, str(out / WEIGHTS_FILE))
    meta = {"backbone": asdict(model.backbone), "schedule": schedule_to_dict(model.schedule),
            "policy_width": model.policy.mlp[0].out_features, **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return json.loads((path / CONFIG_FILE).read_text())
    raise FileNotFoundError(
        f"init_from={str(path)!r} has no {CONFIG_FILE}: point it at a stage's weights/ directory "
        "(model.safetensors + visor.json), or use backbone.pretrained for a LLaVA-OneVision checkpoint"
    )


def load_weights(path: str | Path, schedule: LayerSchedule | None = None) -> VisorModel:
    """Rebuild the model a stage saved; ``schedule`` may replace the saved one if the layer roles agree
    (a new feasible set gets a fresh policy head of the right size)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_config(path)
    saved = schedule_from_dict(meta["schedule"])
    spec = BackboneSpec.from_dict(meta["backbone"])
    use = schedule or saved
    if (use.ca_layers, use.sa_layers) != (saved.ca_layers, saved.sa_layers):
        raise ValueError(f"{path}: saved schedule {saved.describe()} has other CA/SA layers than {use.describe()}")
    model = VisorModel(spec, use, policy_width=meta["policy_width"], host=None)
    state = load_file(str(path / WEIGHTS_FILE))
    if use.feasible != saved.feasible:
        state = {k: v for k, v in state.items() if not k.startswith("policy.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (use.feasible != saved.feasible and k.startswith("policy."))]
    tied = {"lm.lm_head.weight"} if spec.text.tie_word_embeddings else set()
    if [k for k in missing if k not in tied] or unexpected:
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export_llava_onevision(model: VisorModel, out: str | Path, tokenizer=None, image_processor=None) -> Path:
    """Write a dense VISOR model (every layer SA, no CA) as a transformers LLaVA-OneVision directory."""
    from transformers import LlavaOnevisionForConditionalGeneration

    if model.lm.ca_blocks or model.schedule.sa_layers != tuple(range(model.schedule.num_layers)):
        raise ValueError("only a dense model (LayerSchedule.dense) is a plain LLaVA-OneVision checkpoint")
    cfg = model.backbone.to_hf_config()
    host = LlavaOnevisionForConditionalGeneration(cfg)
    view = VisorModel(model.backbone, LayerSchedule.dense(model.schedule.num_layers), host=host)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("policy.", "connector.cpe."))}
    view.load_state_dict(state, strict=False)
    out = Path(out)
    host.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    return out
