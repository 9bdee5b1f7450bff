"""transformers' side of an exported directory, in the environment ``make install`` builds (no torchvision):
``LlavaOnevisionForConditionalGeneration`` and ``LlavaOnevisionProcessor`` load, and the processor's tensors are the
project's own encoding."""

from __future__ import annotations

import pytest
import torch

from visor_lightning.data.collate import Encoder, image_processor_for
from visor_lightning.data.schema import parse_record
from visor_lightning.models import LayerSchedule, VisorModel


def test_exported_directory_loads_in_transformers_and_its_processor_encodes_as_we_do(shards, tmp_path):
    from PIL import Image
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    from visor_lightning.data.hf_processor import llava_onevision_processor
    from visor_lightning.lit.weights import export_llava_onevision

    spec, tok = shards.spec, shards.tokenizer
    model = VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=None).eval()
    out = export_llava_onevision(model, tmp_path / "hf", tok, image_processor_for(spec))
    host = LlavaOnevisionForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    proc = llava_onevision_processor(out)
    assert isinstance(proc, LlavaOnevisionProcessor)

    enc = Encoder(tok, spec, image_processor_for(spec))
    s = spec.vision.image_size
    question = "<image>\nwhat shape is it?"
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    for h, w in [(s, s), (s, 2 * s), (3 * s, s), (97, 61), (6 * s, 6 * s)]:  # every AnyRes grid kind, anyres_max_9
        img = Image.new("RGB", (w, h), (200, 30, 60))
        img.paste((10, 200, 90), (w // 4, h // 3, w // 2, h // 2))
        ours = enc(parse_record({"id": "x", "conversations": [{"from": "human", "value": question},
                                                              {"from": "gpt", "value": "circle"}]}), img)
        theirs = proc(images=[img], text=[text], return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours.prompt_ids.tolist(), (h, w)
        torch.testing.assert_close(theirs["pixel_values"][0], ours.pixel_values, rtol=0, atol=0)
        assert theirs["image_sizes"][0].tolist() == ours.image_size.tolist()
        with torch.no_grad():  # transformers' model takes the processor's output as it is
            logits = host(**theirs).logits
        assert logits.shape[:2] == theirs["input_ids"].shape and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="torchvision"):
        proc(images=None, text=[text], videos=[[img]])
