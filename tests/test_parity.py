"""The VISOR backbone is the host model where it should be: dense parity, text-path parity, checkpoint loading."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import image_batch, make_host, prompt_batch, wake_new_weights
from visor_lightning.models import LayerSchedule, ScheduleConfig, VisorModel


def test_dense_schedule_equals_transformers_llava_onevision(dense_pair):
    """Every layer SA, no CA: logits equal LlavaOnevisionForConditionalGeneration (GQA, AnyRes, left padding)."""
    host, model = dense_pair
    assert host.config.text_config.num_key_value_heads < host.config.text_config.num_attention_heads  # GQA
    sizes = [(32, 32), (40, 70), (64, 40)]
    pixels, image_sizes, n_vis = image_batch(model, sizes)
    assert len(set(n_vis)) == 3  # AnyRes unpadding gives each image its own token count
    ids, mask, rows = prompt_batch(model, n_vis, before=[3, 5, 2], after=[7, 4, 9])
    with torch.no_grad():
        ours = model(ids, pixels, image_sizes, mask)
        for i, row in enumerate(rows):
            ref = host(input_ids=row[None], pixel_values=pixels[i : i + 1], image_sizes=image_sizes[i : i + 1]).logits[0]
            pad = ids.shape[1] - len(row)
            slots = ours.lm.streams.text_valid[i]
            positions = ours.lm.streams.text_idx[i][slots] - pad
            torch.testing.assert_close(ours.logits[i][slots], ref[positions], atol=1e-4, rtol=1e-4)


def test_exported_llava_onevision_directory_gives_the_dense_models_logits(spec, tmp_path):
    """export_llava_onevision loads its weights with strict=False: a key it failed to map would leave the fresh
    directory's random init behind. transformers' model read back from the directory gives our logits."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_lightning.lit.weights import export_llava_onevision

    model = VisorModel(spec, LayerSchedule.dense(spec.text.num_layers), host=make_host(spec, seed=3)).eval()
    export_llava_onevision(model, tmp_path / "hf")
    back = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    pixels, image_sizes, n_vis = image_batch(model, [(40, 70)])
    ids, _, rows = prompt_batch(model, n_vis, before=[3], after=[7])
    with torch.no_grad():
        ours = model(ids, pixels, image_sizes)
        ref = back(input_ids=ids, pixel_values=pixels, image_sizes=image_sizes).logits[0]
    slots = ours.lm.streams.text_valid[0]
    torch.testing.assert_close(ours.logits[0][slots], ref[ours.lm.streams.text_idx[0][slots]], atol=1e-5, rtol=1e-5)


def test_zero_gates_and_no_sa_equal_host_lm_on_text_alone(spec):
    host = make_host(spec)
    model = VisorModel(spec, ScheduleConfig(num_sa=0), host=host).eval()
    assert model.schedule.sa_layers == () and len(model.schedule.ca_layers) == 2
    pixels, image_sizes, n_vis = image_batch(model, [(32, 32)])
    ids, _, _ = prompt_batch(model, n_vis, before=[4], after=[6])
    with torch.no_grad():
        out = model(ids, pixels, image_sizes)
        text_pos = out.lm.streams.text_idx[0]
        text_ids = ids[0, text_pos][None]
        hidden = host.model.language_model(input_ids=text_ids, position_ids=text_pos[None]).last_hidden_state
        ref = host.lm_head(hidden)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    # and with the gates open the image does change the text logits
    wake_new_weights(model)
    with torch.no_grad():
        assert (model(ids, pixels, image_sizes).logits - ref).abs().max() > 1e-3


def test_from_llava_onevision_loads_original_keys_and_reports_new(tiny_checkpoint, spec):
    model, report = VisorModel.from_llava_onevision(tiny_checkpoint, ScheduleConfig())
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    ours = dict(model.named_parameters())
    mapped = 0
    for name, p in ours.items():
        key = VisorModel.original_key(name)
        if key is None:
            continue
        assert key in state, f"{name} -> {key} not in checkpoint"
        torch.testing.assert_close(p.detach(), state[key], atol=0, rtol=0)
        mapped += 1
    assert mapped == report.loaded
    assert set(report.new) == model.new_parameters()
    assert all(n.startswith(("lm.ca_blocks.", "connector.cpe.", "policy.")) for n in report.new)
    assert {k for k in state if "ca_blocks" in k} == set()  # new weights really are new
    assert report.new_params > 0 and "new VISOR weights" in report.summary()
    # a model built on the loaded checkpoint with the dense schedule equals the transformers model from that path
    from transformers import LlavaOnevisionForConditionalGeneration

    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()
    dense, _ = VisorModel.from_llava_onevision(tiny_checkpoint, LayerSchedule.dense(spec.text.num_layers))
    pixels, image_sizes, n_vis = image_batch(dense, [(40, 70)])
    ids, _, _ = prompt_batch(dense, n_vis, before=[3], after=[5])
    with torch.no_grad():
        out = dense.eval()(ids, pixels, image_sizes)
        expected = ref(input_ids=ids, pixel_values=pixels, image_sizes=image_sizes).logits[0, out.lm.streams.text_idx[0]]
    torch.testing.assert_close(out.logits[0], expected, atol=1e-4, rtol=1e-4)


def test_loading_refuses_incomplete_checkpoint(tiny_checkpoint, tmp_path):
    import shutil

    import pytest
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    state = load_file(str(bad / "model.safetensors"))
    dropped = next(k for k in state if "layers.0.mlp" in k)
    del state[dropped]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        VisorModel.from_llava_onevision(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisorModel.from_llava_onevision(tmp_path / "nowhere")


def test_llava_ov_05b_shapes_build_without_weights():
    """The real 0.5B shapes build on the meta device: host size as published (~894M), VISOR's additions listed."""
    from visor_lightning.models import BackboneSpec

    with torch.device("meta"):
        model = VisorModel(BackboneSpec(), ScheduleConfig())
    new = model.new_parameters()
    host = sum(p.numel() for n, p in model.named_parameters() if n not in new)
    ca = sum(p.numel() for n, p in model.named_parameters() if n.startswith("lm.ca_blocks."))
    # exact, from the shapes: Qwen2-0.5B as published (tied head), SigLIP-so400m/14 at 384 with LLaVA-OV's 26 layers
    # (patch conv, 729 positions, per layer 4 attention projections + a 1152-4304-1152 MLP + 2 LayerNorms, the post
    # LayerNorm), the 2-layer projector 1152 -> 896 -> 896 with biases, the image newline
    d, m = 1152, 4304
    siglip = (3 * 14 * 14 * d + d) + 729 * d + 26 * (4 * (d * d + d) + (d * m + m + m * d + d) + 4 * d) + 2 * d
    projector = 1152 * 896 + 896 + 896 * 896 + 896
    assert host == 494_032_768 + siglip + projector + 896 == 893_618_208
    assert len(model.lm.ca_blocks) == 8
    # q/o: 896x896, k/v: 896x128 (GQA), plus norms and the gate, per CA block
    assert ca == 8 * (2 * 896 * 896 + 2 * 896 * 128 + 2 * 896 + 2 * 64 + 1)
