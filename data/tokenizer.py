"""Tokenizers: the checkpoint's own (Qwen2 for LLaVA-OV) or a small BPE trained offline on the demo shards.

The trained one uses ChatML like Qwen2 (``<|im_start|>role\\n...<|im_end|>``) without a system prompt, and has
``<image>`` as a single special token, so the same collation code serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

PAD, IM_START, IM_END, IMAGE = "<|pad|>", "<|im_start|>", "<|im_end|>", "<image>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMAGE]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation_texts(urls: Iterable[str]) -> Iterator[str]:
    """Every turn's text in the shards (JSON members only: images are not decoded)."""
    from .streams import tar_members

    for url in urls:
        for name, data in tar_members(url):
            if name.endswith(".json"):
                try:
                    rec = json.loads(data)
                except ValueError:
                    continue  # counted by the reader; the tokenizer only needs text
                for turn in rec.get("conversations", []) if isinstance(rec, dict) else []:
                    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                        yield turn["value"].replace(IMAGE, "")
    yield "user assistant"  # the role names of the template


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 512):
    """Byte-level BPE over ``texts`` (+ the chat template's role names), saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + special tokens ({256 + len(SPECIAL_TOKENS)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, additional_special_tokens=[IM_START, IMAGE],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def load_tokenizer(path: str | Path):
    """A tokenizer directory (trained here or a checkpoint's); it must know ``<image>`` as one token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} is not a directory: pass a LLaVA-OV checkpoint directory or one written by "
            "`visor data tokenizer`"
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok.encode(IMAGE, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer {path}: '<image>' must be a single token, it encodes to {ids}")
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def backbone_for_tokenizer(spec, tokenizer, multiple: int = 64):
    """A copy of a *from-scratch* backbone spec whose vocabulary and image token match ``tokenizer``.

    The embedded default trains its own tiny base, so its embedding table follows the trained tokenizer
    (rounded up to ``multiple``). A real checkpoint keeps its own tokenizer: this refuses ``pretrained`` specs.
    """
    import copy

    if spec.pretrained:
        raise ValueError("backbone.pretrained is set: use that checkpoint's tokenizer, do not resize its vocabulary")
    out = copy.deepcopy(spec)
    out.text.vocab_size = -(-len(tokenizer) // multiple) * multiple
    out.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    return out
