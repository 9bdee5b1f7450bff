"""KV cache for VISOR decoding.

Per layer it holds exactly the keys that layer's queries can see: text-only layers hold text K/V only; SA layers
hold [V; T] K/V for the samples that ran them as SA; CA blocks hold the visual K/V computed once per image.
Rows of a mixed batch can hold different key sets, so every layer keeps a per-row validity mask.
It implements the one method transformers' attention calls (``update``), so the host layers run unchanged.
"""

from __future__ import annotations

import torch


class _Capture:
    """Stand-in cache for one prefill layer call: remembers the K/V the layer computed."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k, v
        return k, v


class VisorCache:
    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers  # [B, S] bool
        self.ca_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.visual_valid: torch.Tensor | None = None  # [B, Nv]
        self.next_pos: torch.Tensor | None = None  # [B] position of the next token
        self.config_ids: torch.Tensor | None = None

    @classmethod
    def filled(cls, keys: list[int], text: int, batch: int, *, kv_heads: int, head_dim: int, ca_layers: tuple[int, ...] = (),
               visual: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               config_id: int | None = None, seed: int = 0) -> "VisorCache":
        """A cache as a prefill of ``batch`` full-length prompts of ``text`` + ``visual`` tokens would leave it, with
        random contents: layer l holds ``text + keys[l]`` keys (the FLOPs model's per-layer visual keys), each CA
        layer the ``visual`` tokens' K/V.
        Benchmarks decode at batch B without running B prefills (``tests/test_costmodel.py`` checks the layout
        against a real prefill's cache)."""
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        cache = cls(len(keys))
        for l, v in enumerate(keys):
            s = text + v
            cache.k[l], cache.v[l] = rand(batch, kv_heads, s, head_dim), rand(batch, kv_heads, s, head_dim)
            cache.valid[l] = torch.ones(batch, s, dtype=torch.bool, device=device)
        for l in ca_layers:
            cache.ca_kv[l] = (rand(batch, kv_heads, visual, head_dim), rand(batch, kv_heads, visual, head_dim))
        cache.visual_valid = torch.ones(batch, visual, dtype=torch.bool, device=device)
        cache.next_pos = torch.full((batch,), text + visual, dtype=torch.long, device=device)
        if config_id is not None:
            cache.config_ids = torch.full((batch,), config_id, dtype=torch.long, device=device)
        return cache

    def store(self, layer: int, batch: int, parts: list[tuple[torch.Tensor, _Capture, torch.Tensor]]) -> None:
        """Assemble one layer's prefill K/V from per-row-group captures (rows, capture, key validity)."""
        s = max(c.k.shape[2] for _, c, _ in parts)
        k0, v0 = parts[0][1].k, parts[0][1].v
        # keys and values can differ in dtype (under CPU autocast RoPE returns float32 keys, v_proj bfloat16 values)
        k = k0.new_zeros(batch, k0.shape[1], s, k0.shape[3])
        v = v0.new_zeros(batch, v0.shape[1], s, v0.shape[3])
        valid = torch.zeros(batch, s, dtype=torch.bool, device=k0.device)
        for rows, cap, val in parts:
            n = cap.k.shape[2]
            k[rows, :, :n] = cap.k.detach().to(k.dtype)
            v[rows, :, :n] = cap.v.detach().to(v.dtype)
            valid[rows, :n] = val
        self.k[layer], self.v[layer], self.valid[layer] = k, v, valid

    def decode_mask(self, layer: int) -> torch.Tensor:
        """[B, 1, 1, S + 1] bool mask for one new token: the cached valid keys plus itself."""
        valid = self.valid[layer]
        return torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)[:, None, None, :]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by the host attention during decoding: append the new token's K/V."""
        self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
        self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        valid = self.valid[layer_idx]
        self.valid[layer_idx] = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        return self.k[layer_idx], self.v[layer_idx]

    def keys_per_layer(self) -> list[torch.Tensor]:
        """[B] count of valid cached keys per layer (text + visual), for inspection and tests."""
        return [val.sum(1) for val in self.valid]

    def nbytes(self) -> int:
        """Bytes held by valid cache entries (self-attention K/V plus CA visual K/V)."""
        total = 0
        for k, val in zip(self.k, self.valid):
            per_key = 2 * k.shape[1] * k.shape[3] * k.element_size()
            total += int(val.sum()) * per_key
        for k, _ in self.ca_kv.values():
            per_key = 2 * k.shape[1] * k.shape[3] * k.element_size()
            total += int(self.visual_valid.sum()) * per_key
        return total
