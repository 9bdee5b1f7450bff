"""Sample -> model inputs: chat template, tokenisation, ``<image>`` expansion, answer-only labels, image tiles.

:class:`Encoder` runs per sample inside DataLoader workers (so skipping a too-long sample keeps batches
full); :func:`collate` pads a list of encoded samples into the batch ``VisorModel`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .schema import BadSample, Conversation

IGNORE_INDEX = -100
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]  # LLaVA-OV's preprocessor normalisation (SigLIP)


def image_processor_for(spec, path: str | Path | None = None):
    """The LLaVA-OV image processor (AnyRes tiling) for ``spec``: a checkpoint's own when ``path`` holds a
    ``preprocessor_config.json``, else one built from the spec's crop size and grid pinpoints."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(path))
        size = proc.size.get("height") if isinstance(proc.size, dict) else getattr(proc.size, "height", None)
        if size != spec.vision.image_size:
            raise ValueError(f"{path}/preprocessor_config.json: crop size {size} != backbone image_size {spec.vision.image_size}")
        if [list(p) for p in proc.image_grid_pinpoints] != spec.pinpoints():
            raise ValueError(f"{path}/preprocessor_config.json: image_grid_pinpoints differ from the backbone's")
        return proc
    s = spec.vision.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=spec.pinpoints(), do_pad=True,
        image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD,
    )


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [T] full conversation, <image> expanded
    labels: torch.Tensor  # [T] answer tokens only, IGNORE_INDEX elsewhere
    prompt_ids: torch.Tensor  # [P] everything before the last answer + the assistant generation prompt
    pixel_values: torch.Tensor  # [crops, C, S, S]
    image_size: torch.Tensor  # [2] original (height, width)
    meta: dict[str, Any] = field(default_factory=dict)


class Encoder:
    """Per-sample encoding that matches a backbone: its tokenizer's chat template and image token, and the
    number of visual tokens its connector makes for the image's size."""

    def __init__(self, tokenizer, spec, image_processor=None, max_length: int = 4096) -> None:
        self.tok, self.spec, self.max_length = tokenizer, spec, max_length
        self.proc = image_processor if image_processor is not None else image_processor_for(spec)
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        if self.image_id != spec.image_token_id:
            raise ValueError(
                f"tokenizer's <image> id {self.image_id} != backbone.image_token_id {spec.image_token_id}: "
                "use the checkpoint's own tokenizer, or set image_token_id to the tokenizer's"
            )
        if len(tokenizer) > spec.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens > backbone text.vocab_size {spec.text.vocab_size}")
        self.pad_id = tokenizer.pad_token_id

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokens(self, text: str, n_visual: int, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == self.image_id:
                ids += [tid] * n_visual
                labels += [IGNORE_INDEX] * n_visual
                continue
            ids.append(tid)
            labels.append(tid if any(a <= start < b for a, b in spans) else IGNORE_INDEX)
        return ids, labels

    def __call__(self, conv: Conversation, image) -> Encoded:
        msgs = conv.messages
        full = self._render(msgs, False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                before = self._render(msgs[:i], True)
                upto = self._render(msgs[: i + 1], False)
                if not full.startswith(before) or not full.startswith(upto):
                    raise ValueError("the tokenizer's chat template is not prefix-consistent; labels cannot be placed")
                spans.append((len(before), len(upto)))
        h, w = image.height, image.width
        n_visual = self.spec.visual_tokens(h, w)
        ids, labels = self._tokens(full, n_visual, spans)
        if len(ids) > self.max_length:
            raise BadSample("too_long", f"{len(ids)} tokens ({n_visual} visual) > max_length {self.max_length}")
        if ids.count(self.image_id) != n_visual:
            raise BadSample("placeholder_mismatch", "the chat template dropped or duplicated <image>")
        prompt, _ = self._tokens(self._render(msgs[:-1], True), n_visual, [])
        px = self.proc([image], return_tensors="pt")
        return Encoded(
            input_ids=torch.tensor(ids), labels=torch.tensor(labels), prompt_ids=torch.tensor(prompt),
            pixel_values=px["pixel_values"][0], image_size=px["image_sizes"][0],
            meta={"id": conv.id, "subset": conv.subset, "source": conv.source, "task": conv.extra.get("task", ""),
                  "answer": conv.answer, "question": conv.question},
        )


def collate(samples: list[Encoded], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-padded training tensors, left-padded generation prompts, crop-padded pixels, and per-sample meta.

    ``pad_to_multiple_of`` rounds both lengths up (a compiled model then meets few distinct shapes)."""
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    from visor_lightning.models.visor import left_pad

    def rounded(x: torch.Tensor, value: int, left: bool = False) -> torch.Tensor:
        extra = -x.shape[1] % pad_to_multiple_of
        return F.pad(x, (extra, 0) if left else (0, extra), value=value) if extra else x

    ids = rounded(pad_sequence([s.input_ids for s in samples], batch_first=True, padding_value=pad_id), pad_id)
    labels = rounded(pad_sequence([s.labels for s in samples], batch_first=True, padding_value=IGNORE_INDEX), IGNORE_INDEX)
    mask = rounded(pad_sequence([torch.ones_like(s.input_ids) for s in samples], batch_first=True, padding_value=0), 0)
    prompt_ids, prompt_mask = left_pad([s.prompt_ids for s in samples], pad_id)
    prompt_ids, prompt_mask = rounded(prompt_ids, pad_id, left=True), rounded(prompt_mask, 0, left=True)
    crops = max(s.pixel_values.shape[0] for s in samples)
    pixels = torch.stack([torch.cat([s.pixel_values, s.pixel_values.new_zeros(crops - s.pixel_values.shape[0], *s.pixel_values.shape[1:])]) for s in samples])
    batch: dict[str, Any] = {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "pixel_values": pixels, "image_sizes": torch.stack([s.image_size for s in samples]),
    }
    for k in samples[0].meta:
        batch[k] = [s.meta[k] for s in samples]
    return batch
