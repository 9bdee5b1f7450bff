"""The stages' optimizer: fused AdamW where torch has the kernel, the same updates as the default one."""

from __future__ import annotations

import torch

from visor_lightning.optim import adamw


def test_fused_where_possible_and_the_same_updates():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin.load_state_dict(net.state_dict())
    fused = adamw(net.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(30):
        for model, opt in ((net, fused), (twin, plain)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert adamw([torch.nn.Parameter(torch.zeros(3), requires_grad=True)], lr=1e-3, fused=False).defaults["fused"] is False
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert adamw([meta], lr=1e-3).defaults["fused"] is None  # no fused kernel there: the default implementation


def test_the_stages_trained_with_it(tiny_pipeline):
    """The demo pipeline's checkpoints record the optimizer each stage stepped."""
    ckpts = sorted(tiny_pipeline["out"].glob("*/checkpoints/last.ckpt"))
    assert len(ckpts) >= 4
    for path in ckpts:
        groups = torch.load(path, map_location="cpu", weights_only=False)["optimizer_states"][0]["param_groups"]
        assert all(g["fused"] is True for g in groups), path
