"""Hand-over between stages: weights (not optimizer state) as safetensors plus ``visor.json``.

``visor.json`` records the backbone shapes, the resolved layer schedule (including a feasible set found by the
universal stage), the policy width and what its head predicts (``policy_head``: choice or correctness), so the next stage rebuilds exactly this model. ``export_llava_onevision``
writes a from-scratch dense base as a transformers LLaVA-OneVision directory, so VISOR is applied to it exactly
as to a downloaded checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from visor_lightning.models import BackboneSpec, LayerSchedule, VisorModel
from visor_lightning.models.schedule import schedule_from_dict, schedule_to_dict  # noqa: F401 (re-exported)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "visor.json"


def weights_meta(model: VisorModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``visor.json`` holds: enough to rebuild exactly this model (also stored inside checkpoints)."""
    return {"backbone": asdict(model.backbone), "schedule": schedule_to_dict(model.schedule),
            "policy_width": model.policy.mlp[0].out_features, "policy_head": model.policy.head,
            "policy_trained": model.policy.trained, **(extra or {})}


def fp32_state(model: VisorModel) -> dict[str, torch.Tensor]:
    """The state dict as standalone fp32 tensors, each tied tensor once (the first name keeps it).

    A tensor is copied only where it must be: converted to fp32, or a view into a larger buffer (DeepSpeed ZeRO
    flattens parameters into one, and safetensors refuses views). At 0.5B, copying every fp32 tensor held a second
    3.6 GB beside the optimizer state at the end of a stage.
    """
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        t = t.detach()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.clone()
        state[name] = t
    return state


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format one tensor at a time, straight from their memory.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy: at 0.5B that is 3.6 GB more
    at the end of a stage, which a 24 GB machine did not have. The file is the same format (read back by
    ``safetensors.torch.load_file``); it is written to a temporary name and renamed, so a kill leaves no half file.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    order = []
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors code")
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        order.append(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in order:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: VisorModel, out: str | Path, extra: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """``out/model.safetensors`` (fp32; ``state`` overrides the module's own tensors, e.g. the fp32 master
    weights of a bf16 DeepSpeed run) + ``out/visor.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = fp32_state(model)
    if state is not None:
        missing = set(tensors) - set(state)
        if missing:
            raise ValueError(f"state for {out} lacks {sorted(missing)[:5]}")
        tensors = {k: state[k].detach().float().contiguous() if state[k].is_floating_point() else state[k]
                   for k in tensors}
    write_safetensors(tensors, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(weights_meta(model, extra), indent=2))
    return out


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def weights_dir(path: str | Path) -> Path:
    """``init_from`` as a weights directory.

    A stage's ``weights/`` is used as is. A Lightning ``.ckpt`` file or a DeepSpeed checkpoint directory (ZeRO
    shards) is converted once to fp32 weights in ``<checkpoint>.weights/`` beside it; both carry the model's
    ``visor.json`` content (``VisorLitModule.on_save_checkpoint``). Ranks racing on the conversion each write a
    private directory and the first rename wins.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if not (path.is_file() or is_deepspeed_checkpoint(path)):
        return path  # read_config names what is missing
    out = path.with_name(path.name + ".weights")
    if (out / CONFIG_FILE).is_file() and (out / CONFIG_FILE).stat().st_mtime >= _mtime(path):
        return out
    if is_deepspeed_checkpoint(path):
        ckpt = _deepspeed_fp32(path)
    else:
        try:  # Lightning checkpoints hold tensors and plain containers only: no arbitrary unpickling
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"init_from={str(path)!r} is not a readable Lightning checkpoint: {e}") from e
    if "visor" not in ckpt:
        raise ValueError(f"init_from={str(path)!r} is a checkpoint without VISOR model metadata ('visor' key): "
                         "it was not written by a visor stage")
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    meta = ckpt["visor"]
    model = VisorModel(BackboneSpec.from_dict(meta["backbone"]), schedule_from_dict(meta["schedule"]),
                       policy_width=meta["policy_width"], host=None)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    save_weights(model, tmp, {k: v for k, v in meta.items() if k not in ("backbone", "schedule", "policy_width")},
                 state=state)
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another rank renamed first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mtime(path: Path) -> float:
    return max(p.stat().st_mtime for p in [path, *path.rglob("*")])


def _deepspeed_fp32(path: Path) -> dict[str, Any]:
    """Consolidate ZeRO shards into fp32 (DeepSpeed's own files are pickles: only open checkpoints you wrote)."""
    import tempfile

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        return convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "fp32.pt")


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return json.loads((path / CONFIG_FILE).read_text())
    what = "does not exist" if not path.exists() else f"has no {CONFIG_FILE}"
    raise FileNotFoundError(
        f"init_from={str(path)!r} {what}: point it at a stage's weights/ directory (model.safetensors + "
        "visor.json) or one of its checkpoints, or use backbone.pretrained for a LLaVA-OneVision checkpoint"
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
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}/{WEIGHTS_FILE} is missing: the stage did not finish writing its weights") from None
    except Exception as e:  # safetensors reads no code: a damaged file fails its header or size check
        raise ValueError(f"{path}/{WEIGHTS_FILE} is truncated or not a safetensors file ({e}); "
                         "re-export it from the stage's checkpoints (init_from=<run>/checkpoints/last.ckpt)") from e
    if use.feasible != saved.feasible:
        state = {k: v for k, v in state.items() if not k.startswith("policy.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (use.feasible != saved.feasible and k.startswith("policy."))]
    tied = {"lm.lm_head.weight"} if spec.text.tie_word_embeddings else set()
    if [k for k in missing if k not in tied] or unexpected:
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if use.feasible == saved.feasible:  # the trained head's kind (weights written before it was recorded: a classifier)
        model.policy.head = meta.get("policy_head", "choice")
        # weights written before policy_trained was recorded: only a policy stage trains the policy
        model.policy.trained = bool(meta.get("policy_trained", meta.get("stage") == "policy"))
    return model


def export_llava_onevision(model: VisorModel, out: str | Path, tokenizer=None, image_processor=None) -> Path:
    """Write a dense VISOR model (every layer SA, no CA) as a transformers LLaVA-OneVision directory."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_lightning.data.hf_processor import write_processor_config

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
        write_processor_config(model.backbone, out)  # what LlavaOnevisionProcessor reads beside the image processor
    return out
