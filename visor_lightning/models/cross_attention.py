"""The new cross-attention (CA) block: text queries read the latest visual tokens.

Pre-norm, q/k RMSNorm, grouped-query attention like the host LLM, and a zero-initialised tanh gate on the
residual, so that at initialisation the model is exactly its text path (Flamingo / Llama-3.2-Vision practice).
No RoPE: visual positions come from the connector's depthwise-conv CPE. K/V depend only on the visual tokens,
so they are computed once per image (and cached for decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class CrossAttentionBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"CA block: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads} do not divide")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.text_norm = RMSNorm(hidden_size, eps)
        self.visual_norm = RMSNorm(hidden_size, eps)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.gate = nn.Parameter(torch.zeros(1))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=hidden_size**-0.5)

    def visual_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Nv, d] -> K, V of shape [B, kv_heads, Nv, head_dim] (once per image and CA layer)."""
        b, n, _ = visual.shape
        v_in = self.visual_norm(visual)
        k = self.k_norm(self.k_proj(v_in).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(v_in).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, text: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text [B, Nt, d]; mask [B, Nt, Nv] bool (True = may attend). Rows with no visible token add nothing."""
        b, n, _ = text.shape
        q = self.q_norm(self.q_proj(self.text_norm(text)).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        has_any = mask.any(-1, keepdim=True)  # [B, Nt, 1]
        safe = (mask | ~has_any)[:, None]  # avoid all-masked rows (NaN); their output is zeroed below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, enable_gqa=self.num_heads != self.num_kv_heads)
        out = self.o_proj(out.transpose(1, 2).reshape(b, n, -1)) * has_any.to(text.dtype)
        return text + torch.tanh(self.gate).to(text.dtype) * out
