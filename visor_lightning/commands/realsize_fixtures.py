"""What a first real run reads, made on this machine: a random-weight LLaVA-OneVision directory at the shapes of an
experiment's ``model:`` section, and a parquet split in LLaVA-OneVision-Data's layout with real photographs.

The directory has the file layout of ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` (config.json, generation_config.json,
model.safetensors, preprocessor_config.json, processor_config.json, chat_template.json, tokenizer.json,
tokenizer_config.json, vocab.json, merges.txt, added_tokens.json, special_tokens_map.json) and the same special-token
ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<image>`` 151646, ``<video>``
151647), so everything that loads it loads the real one the same way. Only the weights are random and the
tokenizer's byte-level BPE merges are few (trained on the fixture's text; the rest of Qwen2's 151,643 regular
entries are unreachable fillers): token ids stay in range and every special token is where Qwen2 has it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

QWEN2_REGULAR = 151643  # Qwen2's regular (non-added) vocabulary entries
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]  # ids 151643.. in this order
# LLaVA-OneVision's processor chat template (content as a list of {"type": "image"|"text"} items)
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def fixture_texts() -> list[str]:
    """Text the fixture's tokenizer learns its merges from: the conversations and the chat roles."""
    return [t["value"] for conv in (conversation(i, 640, 427, "photo") for i in range(8)) for t in conv] + \
        ["user assistant system"]


def qwen2_shaped_tokenizer(out: Path, texts: list[str]):
    """A Qwen2Tokenizer with Qwen2's vocabulary size and special-token ids (few real merges; see the module doc)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from visor_lightning.data.tokenizer import CHATML_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) for m in model["merges"]]
    for i in range(len(vocab), QWEN2_REGULAR):
        vocab[f"<|unused_{i}|>"] = i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # <|endoftext|> = unk = eos = pad -> id 151643
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    ids = tok.convert_tokens_to_ids(SPECIALS)
    if ids != list(range(QWEN2_REGULAR, QWEN2_REGULAR + len(SPECIALS))):
        raise RuntimeError(f"special-token ids {ids} are not Qwen2's")
    tok.save_pretrained(str(out))
    # the slow-tokenizer files of the released directory (transformers 5 writes tokenizer.json only)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "added_tokens.json").write_text(json.dumps({s: QWEN2_REGULAR + i for i, s in enumerate(SPECIALS)}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": SPECIALS[1:], "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}, indent=2))
    return tok


def write_random_checkpoint(config: str | Path, out: str | Path, seed: int = 0, dtype: str = "bfloat16") -> dict[str, Any]:
    """``LlavaOnevisionForConditionalGeneration`` at the shapes of ``config``'s ``model.backbone``, random weights
    saved in ``dtype`` (the released 0.5B checkpoint is 16-bit), with its tokenizer, image processor and processor
    files. Returns what was written (parameters, bytes)."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    from visor_lightning.config import load_model_section
    from visor_lightning.data.collate import image_processor_for
    from visor_lightning.data.hf_processor import write_processor_config

    spec = load_model_section(config).backbone
    if spec.text.vocab_size < QWEN2_REGULAR + len(SPECIALS) or spec.image_token_id != QWEN2_REGULAR + 3:
        raise ValueError(f"{config}: a Qwen2-shaped checkpoint needs text.vocab_size >= {QWEN2_REGULAR + len(SPECIALS)} "
                         f"and image_token_id {QWEN2_REGULAR + 3} (got {spec.text.vocab_size}, {spec.image_token_id})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = spec.to_hf_config()
    cfg.pad_token_id = QWEN2_REGULAR
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    del model
    GenerationConfig(bos_token_id=QWEN2_REGULAR, eos_token_id=QWEN2_REGULAR + 2, pad_token_id=QWEN2_REGULAR).save_pretrained(str(out))
    qwen2_shaped_tokenizer(out, fixture_texts())
    proc = image_processor_for(spec)
    proc.save_pretrained(str(out))
    write_processor_config(spec, out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_OV_CHAT_TEMPLATE}, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"dir": str(out), "params": params, "bytes": size, "dtype": dtype}


# ---- the parquet fixture ------------------------------------------------------------------------------------
# (height, width) of the fixture's photographs: AnyRes maps each to another grid of 384-px crops (rows x cols)
FIXTURE_SIZES = [(288, 384), (384, 288), (320, 640), (640, 320), (384, 512), (427, 640)]


def conversation(i: int, h: int, w: int, name: str) -> list[dict[str, str]]:
    """A multi-turn LLaVA conversation about a photograph (answers true of the image as stored)."""
    shape = "wider than it is tall" if w > h else "taller than it is wide" if h > w else "square"
    turns = [("What is the size of this image in pixels?", f"{w} by {h}."),
             ("Is the picture wider or taller?", f"It is {shape}."),
             ("Which photograph is it?", f"The {name} photograph.")]
    conv = []
    for k, (q, a) in enumerate(turns[: 2 + i % 2]):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def write_parquet_fixture(out: str | Path, rows: int = 12, files: int = 2,
                          sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """``rows`` samples in LLaVA-OneVision-Data's parquet layout (``id``, ``image`` = {bytes, path},
    ``conversations``, ``data_source``) over ``files`` files: scikit-learn's two sample photographs (427x640 JPEGs),
    cropped and resized to ``sizes`` (height, width; default :data:`FIXTURE_SIZES`: several aspect ratios, so AnyRes
    picks different grids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sizes = list(sizes or FIXTURE_SIZES)
    photos = load_sample_images()
    names = [Path(f).stem for f in photos.filenames]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        h, w = sizes[i % len(sizes)]
        k = (i // len(sizes) + i) % len(names)
        src = Image.fromarray(photos.images[k])
        # crop the source to the target aspect ratio around its centre, then resize to the target size
        sw, sh = src.size
        cw, ch = (sw, round(sw * h / w)) if sw * h / w <= sh else (round(sh * w / h), sh)
        left, top = (sw - cw) // 2, (sh - ch) // 2
        img = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        records.append({"id": f"{names[k]}-{i:04d}", "image": {"bytes": buf.getvalue(), "path": f"{names[k]}-{i:04d}.jpg"},
                        "conversations": conversation(i, h, w, names[k]), "data_source": "sklearn_sample_images"})
    schema = pa.schema([
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
    ])
    per = -(-rows // files)
    written = []
    for f in range(files):
        part = records[f * per:(f + 1) * per]
        if part:
            path = out / "sklearn_photos" / f"train-{f:05d}-of-{files:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part, schema=schema), path, row_group_size=4)
            written.append(str(path))
    return {"dir": str(out), "files": written, "rows": rows, "sizes": [sizes[i % len(sizes)] for i in range(rows)]}
