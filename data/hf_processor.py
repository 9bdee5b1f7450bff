"""transformers' ``LlavaOnevisionProcessor`` for an exported (or released) LLaVA-OneVision directory, with or without
torchvision.

Why: transformers' LLaVA-OneVision processor holds a video processor, and every transformers video processor needs
torchvision. The only torchvision wheels these machines can install are linked against the CUDA torch and fail to
load beside ``torch+cpu`` (``make install`` removes them; docs/eval.md). So ``LlavaOnevisionProcessor.from_pretrained``
fails in the project's environment. ``llava_onevision_processor(dir)`` returns transformers' own processor where
torchvision works, and otherwise the same class without its video processor: images and text are processed by
transformers' unchanged code (AnyRes tiling, ``<image>`` expansion); only ``videos=`` is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available


def processor_config(spec) -> dict[str, Any]:
    """``processor_config.json`` as the released LLaVA-OneVision directories carry it, for ``spec``'s shapes."""
    return {"num_image_tokens": spec.vision.tokens_per_crop, "processor_class": "LlavaOnevisionProcessor",
            "vision_aspect_ratio": spec.vision_aspect_ratio, "vision_feature_select_strategy": "full"}


def write_processor_config(spec, out: str | Path) -> Path:
    path = Path(out) / "processor_config.json"
    path.write_text(json.dumps(processor_config(spec), indent=2))
    return path


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` with an image processor and a tokenizer only (no video processor, hence no
    torchvision). Same attributes, same ``__call__`` for images and text."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>",
                 vision_aspect_ratio="anyres_max_9", **kwargs) -> None:
        # LlavaOnevisionProcessor.__init__ passes a video processor on; set what it sets, then skip to the mixin
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", image_token)
        self.video_token = getattr(tokenizer, "video_token", video_token)
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("videos need transformers' video processor, which needs torchvision (not installed; "
                             "see docs/eval.md, 'Known install traps')")
        return super().__call__(images=images, text=text, **kwargs)


def llava_onevision_processor(path: str | Path, **kwargs) -> LlavaOnevisionProcessor:
    """The processor of LLaVA-OneVision directory ``path`` (``visor fit``'s ``hf/`` export or a released checkpoint)."""
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path}/preprocessor_config.json: no such file (not a LLaVA-OneVision directory)")
    if not (path / "processor_config.json").is_file():
        raise FileNotFoundError(f"{path}/processor_config.json: no such file; write_processor_config(spec, dir) adds it "
                                "(directories exported before it was written lack it)")
    cls = LlavaOnevisionProcessor if is_torchvision_available() else ImageOnlyLlavaOnevisionProcessor
    return cls.from_pretrained(str(path), **kwargs)
