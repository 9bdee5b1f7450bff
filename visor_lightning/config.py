"""Reading the ``model:`` section of an experiment YAML into typed specs, with errors that name file and key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models.schedule import LayerSchedule, ScheduleConfig
from .models.spec import BackboneSpec


@dataclass
class ModelSection:
    backbone: BackboneSpec
    schedule: LayerSchedule
    policy_width: int = 256


def load_model_section(path: str | Path) -> ModelSection:
    """Parse ``model.backbone``, ``model.schedule`` and ``model.policy_width`` of an experiment YAML.

    Unknown keys and wrong types raise a ValueError naming the file and the key. A ``backbone.pretrained``
    directory supplies the shapes from its config.json (no weights are read).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    model: Any = raw.get("model") if raw is not None else None
    if model is None:
        raise ValueError(f"{path}: no 'model:' section")
    if "class_path" in model:  # a LightningCLI stage config: the model's shapes sit in init_args
        model = OmegaConf.masked_copy(model.get("init_args") or {}, ["backbone", "schedule", "policy_width"])
    unknown = set(model.keys()) - {"backbone", "schedule", "policy_width"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) model.{sorted(unknown)}; expected backbone, schedule, policy_width")
    try:
        backbone = OmegaConf.merge(OmegaConf.structured(BackboneSpec), model.get("backbone") or {})
        sched = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), model.get("schedule") or {})
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ValueError(f"{path}: bad value at model.{key}: {e.msg if hasattr(e, 'msg') else e}") from e
    spec: BackboneSpec = OmegaConf.to_object(backbone)
    if spec.pretrained:
        pretrained = Path(spec.pretrained)
        if not pretrained.is_absolute():
            pretrained = (path.parent / pretrained) if (path.parent / pretrained).exists() else pretrained
        try:
            spec = dataclasses.replace(BackboneSpec.from_pretrained_dir(pretrained), token_pool=spec.token_pool)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: model.{e}") from e
    try:
        spec.pool_shape
    except ValueError as e:
        raise ValueError(f"{path}: model.{e}") from e
    sched_cfg: ScheduleConfig = OmegaConf.to_object(sched)
    width = model.get("policy_width", 256)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{path}: model.policy_width must be a positive integer, got {width!r}")
    try:
        schedule = LayerSchedule.build(spec.text.num_layers, sched_cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return ModelSection(spec, schedule, width)
