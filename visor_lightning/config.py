"""Reading the ``model:`` section of an experiment YAML into typed specs, with errors that name file and key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models.schedule import LayerSchedule, ScheduleConfig
from .models.spec import BackboneSpec


DEFAULT_SHAPES = "the default shapes (LLaVA-OneVision 0.5B: BackboneSpec())"


@dataclass
class ModelSection:
    backbone: BackboneSpec
    schedule: LayerSchedule
    policy_width: int = 256
    source: str = "config"  # where the shapes come from: "config", "weights DIR", or DEFAULT_SHAPES


def load_weights_section(weights: str | Path, where: str = "--weights") -> ModelSection:
    """The model a stage saved in ``weights`` (its ``visor.json``; no tensors are read)."""
    import json

    from .models.schedule import schedule_from_dict

    meta_file = Path(weights) / "visor.json"
    if not meta_file.is_file():
        what = "no such directory" if not Path(weights).exists() else "no visor.json there"
        raise FileNotFoundError(f"{where} {weights}: {what}; point it at a stage's weights/ directory "
                                "(model.safetensors + visor.json)")
    meta = json.loads(meta_file.read_text())
    return ModelSection(BackboneSpec.from_dict(meta["backbone"]), schedule_from_dict(meta["schedule"]),
                        meta["policy_width"], source=f"weights {weights}")


def load_model_section(path: str | Path) -> ModelSection:
    """The model an experiment YAML describes: ``model.backbone``, ``model.schedule`` and ``model.policy_width``.

    A stage config (LightningCLI's ``class_path``/``init_args``) describes the model its stage trains: the run's own
    ``weights/`` when the file is a finished run's ``config.yaml``, else ``init_from``'s saved shapes, else its
    ``backbone`` (with ``tokenizer_vocab``'s vocabulary), each with the stage's own schedule rule (the dense base is
    dense). Without any of these the shapes are the defaults, and ``source`` says so. A ``backbone.pretrained``
    directory supplies the shapes from its config.json (no weights are read). Unknown keys and wrong types raise a
    ValueError naming the file and the key.
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
    from .config_check import check_model_keys, check_stage_args, import_class

    stage = None
    if "class_path" in model:  # a LightningCLI stage config: the model's shapes sit in init_args
        check_stage_args(["--config", str(path)])  # every unknown key at once, with its line and a near miss
        try:
            stage = import_class(model.class_path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model = OmegaConf.masked_copy(model.get("init_args") or {},
                                      ["backbone", "schedule", "policy_width", "init_from", "tokenizer_vocab"])
    else:
        check_model_keys(path)
    try:
        backbone = OmegaConf.merge(OmegaConf.structured(BackboneSpec), model.get("backbone") or {})
        sched = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), model.get("schedule") or {})
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ValueError(f"{path}: bad value at model.{key}: {e.msg if hasattr(e, 'msg') else e}") from e
    sched_cfg: ScheduleConfig = OmegaConf.to_object(sched)
    if stage is not None:
        own = path.parent / "weights"  # a finished run's config.yaml sits beside the weights it wrote
        init_from = model.get("init_from")
        if (own / "visor.json").is_file() or init_from:
            section = load_weights_section(own if (own / "visor.json").is_file() else init_from,
                                           where=f"{path}: model.init_args.init_from")
            if model.get("schedule") is not None:  # the stage replaces the saved schedule, as training does
                section.schedule = _schedule(path, stage, section.backbone, sched_cfg)
            return section
    spec: BackboneSpec = OmegaConf.to_object(backbone)
    if spec.pretrained:
        pretrained = Path(spec.pretrained)
        if not pretrained.is_absolute():
            pretrained = (path.parent / pretrained) if (path.parent / pretrained).exists() else pretrained
        try:
            spec = dataclasses.replace(BackboneSpec.from_pretrained_dir(pretrained), token_pool=spec.token_pool)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: model.{e}") from e
    elif model.get("tokenizer_vocab"):  # a from-scratch stage sizes its vocabulary to the tokenizer it trains with
        from .data.tokenizer import backbone_for_tokenizer, load_tokenizer

        try:
            spec = backbone_for_tokenizer(spec, load_tokenizer(model.tokenizer_vocab))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: model.init_args.tokenizer_vocab={model.tokenizer_vocab!r}: {e}") from e
    try:
        spec.pool_shape
    except ValueError as e:
        raise ValueError(f"{path}: model.{e}") from e
    width = model.get("policy_width", 256)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{path}: model.policy_width must be a positive integer, got {width!r}")
    schedule = _schedule(path, stage, spec, sched_cfg)
    source = "config" if model.get("backbone") is not None else DEFAULT_SHAPES
    return ModelSection(spec, schedule, width, source=source)


def _schedule(path: Path, stage, spec: BackboneSpec, cfg: ScheduleConfig) -> LayerSchedule:
    try:
        if stage is not None:
            return stage.schedule_for(spec, cfg)
        return LayerSchedule.build(spec.text.num_layers, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
