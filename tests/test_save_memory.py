"""Saving costs no second copy of the model: found at real size (`visor realsize`), checked here at 256 MB.

At 0.5B, Lightning's checkpoint save (serialised into an in-memory buffer, then copied to write it) and the hand-over
weights (every fp32 tensor cloned, then turned into ``bytes`` by safetensors) each needed several GB beside the
optimizer state, and the full fine-tune was killed for memory on a 24 GB machine. Each save runs in a fresh process
here, so its peak resident memory is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from visor_lightning.lit.weights import fp32_state, write_safetensors

MB = 2**20
SIZE_MB = 256

PRELUDE = textwrap.dedent(f"""
    import json, resource, sys, torch
    from visor_lightning.lit.safety import AtomicCheckpointIO
    from visor_lightning.lit.weights import fp32_state, write_safetensors
    def peak():  # ru_maxrss: kilobytes on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    big = torch.nn.Linear({SIZE_MB * MB // 4 // 4096}, 4096, bias=False)  # {SIZE_MB} MB of fp32
    torch.nn.init.normal_(big.weight)
    before = peak()
""")


def _extra_mb(body: str, tmp_path) -> float:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps((peak() - before) / 2**20))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_checkpoint_is_written_without_holding_a_copy_in_memory(tmp_path):
    extra = _extra_mb(f"""
        AtomicCheckpointIO().save_checkpoint({{"state_dict": big.state_dict()}}, r"{tmp_path}/c/step=1.ckpt")
    """, tmp_path)
    assert extra < SIZE_MB / 4, f"saving a {SIZE_MB} MB checkpoint took {extra:.0f} MB more"
    back = torch.load(tmp_path / "c" / "step=1.ckpt", weights_only=True)["state_dict"]["weight"]
    assert back.shape == (4096, SIZE_MB * MB // 4 // 4096) and back.std() > 0.9


def test_hand_over_weights_are_written_without_a_copy(tmp_path):
    extra = _extra_mb(f"""
        write_safetensors(fp32_state(big), r"{tmp_path}/model.safetensors")
    """, tmp_path)
    assert extra < SIZE_MB / 4, f"writing {SIZE_MB} MB of weights took {extra:.0f} MB more"


def test_write_safetensors_reads_back_exactly_every_dtype_and_tied_tensors_once(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied, as Qwen2-0.5B's
            self.lowp = torch.nn.Parameter(torch.randn(3, 5).to(torch.bfloat16))
            self.register_buffer("steps", torch.arange(7))
            self.register_buffer("flag", torch.tensor(True))
            self.register_buffer("empty", torch.zeros(0, 3))

    m = M()
    state = fp32_state(m)
    assert "head.weight" not in state and state["lowp"].dtype == torch.float32  # tied once; floats as fp32
    assert state["emb.weight"].data_ptr() == m.emb.weight.data_ptr()  # an fp32 tensor of its own is not copied
    flat = torch.arange(12.0)  # views into one buffer (DeepSpeed's flattening) are copied: safetensors needs it
    views = fp32_state(torch.nn.ParameterDict({"a": torch.nn.Parameter(flat[:4]), "b": torch.nn.Parameter(flat[4:])}))
    assert views["b"].data_ptr() != flat[4:].data_ptr() and views["b"].tolist() == list(range(4, 12))
    write_safetensors({**state, "raw_bf16": m.lowp.detach()}, tmp_path / "w.safetensors", {"stage": "x"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(state) | {"raw_bf16"}
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert back["raw_bf16"].dtype == torch.bfloat16 and torch.equal(back["raw_bf16"], m.lowp.detach())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
