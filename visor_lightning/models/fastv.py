"""FastV-style visual-token pruning on the dense host model: the token-reduction peer VISOR is compared with.

FastV (Chen et al., 2024) runs layers 0..K-1 over the whole sequence, ranks the visual tokens by the attention the
last token pays them in layer K-1 (mean over heads, as FastV's in-place variant does) and drops the lowest-ranked
fraction R from layers K..L-1. Kept tokens keep their original RoPE positions, so R = 0 is the dense model exactly.
It needs attention scores, which SDPA does not return, so only the last token's row of layer K-1 is recomputed
(one query: a negligible cost, left out of the FLOPs model as FastV's own Eq. 5 leaves it out).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .cache import VisorCache, _Capture


def fastv_keep(num_visual: int, ratio: float) -> int:
    """Visual tokens FastV keeps of ``num_visual`` at drop ratio ``ratio``: the one definition the model and
    the FLOPs model share (round half up)."""
    return num_visual - math.floor(num_visual * ratio + 0.5)


@dataclass(frozen=True)
class FastVConfig:
    """Prune after layer ``layer - 1`` (FastV's K, >= 1), dropping ``ratio`` (FastV's R) of the visual tokens."""

    layer: int = 2
    ratio: float = 0.5

    _PATTERN = re.compile(r"^fastv\(k=(\d+),r=([0-9.]+)\)$")

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV layer K must be >= 1 (it ranks tokens by layer K-1's attention), got {self.layer}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"FastV ratio R must be in [0, 1], got {self.ratio}")

    @property
    def name(self) -> str:
        return f"fastv(k={self.layer},r={self.ratio:.3f})"

    @classmethod
    def parse(cls, name: str) -> "FastVConfig | None":
        """``fastv(k=2,r=0.500)`` -> FastVConfig(2, 0.5); any other name -> None."""
        m = cls._PATTERN.match(name.replace(" ", ""))
        return cls(int(m.group(1)), float(m.group(2))) if m else None


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] keep mask -> (slot -> sequence index [B, M], slot valid [B, M]); kept tokens first, in order."""
    m = int(keep.sum(1).max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=keep.device)[None] < keep.sum(1, keepdim=True)
    return order, valid


def fastv_prefill(
    lm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    is_visual: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: FastVConfig,
    cache: VisorCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense prefill with FastV pruning. Returns (last-token logits [B, vocab], kept visual tokens per row [B]).

    ``lm`` is a :class:`~visor_lightning.models.visor_lm.VisorLanguageModel` whose schedule has no CA layers
    (the host model); prompts are left-padded as for ``generate``. ``cache`` receives every layer's K/V (full
    sequence before K, pruned after), so :meth:`VisorLanguageModel.decode_step` continues from it unchanged.
    """
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from .visor_lm import _self_mask

    if len(lm.ca_blocks):
        raise ValueError("FastV runs on the dense host model (a schedule without CA layers), e.g. the base stage's weights")
    if cfg.layer > len(lm.layers):
        raise ValueError(f"FastV layer K={cfg.layer} is beyond the model's {len(lm.layers)} layers")
    b, n, _ = inputs_embeds.shape
    valid = attention_mask.bool()
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    x = inputs_embeds
    mask = _self_mask(valid)
    cos, sin = lm.rotary_emb(x, pos)
    vis = is_visual & valid
    n_vis = vis.sum(1)
    kept = n_vis.clone()
    last = torch.full((b,), n - 1, device=x.device)  # left-padded: every row's last real token is at n - 1
    rows = torch.arange(b, device=x.device)
    for l, layer in enumerate(lm.layers):
        if l == cfg.layer:
            keep_n = torch.tensor([fastv_keep(int(v), cfg.ratio) for v in n_vis.tolist()], device=x.device)
            keep = valid & ~vis
            if int((n_vis - keep_n).max()) > 0:
                # layer K-1's attention from the last token: its query again, the keys the layer cached
                attn = layers_prev.self_attn
                h = layers_prev.input_layernorm(x_prev[:, -1:])
                q = attn.q_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
                k = cap.k.repeat_interleave(q.shape[1] // cap.k.shape[1], dim=1)
                scores = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(~valid[:, None, None, :], float("-inf"))
                received = scores.softmax(-1).mean(1)[:, 0]  # [B, N]
                received = received.masked_fill(~vis, float("-inf"))
                rank = received.argsort(1, descending=True).argsort(1)  # 0 = most attended
                keep |= vis & (rank < keep_n[:, None])
            else:
                keep |= vis
            kept = keep_n
            idx, valid = _compact(keep)
            last = valid.long().sum(1) - 1  # kept tokens sit first
            x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
            pos = pos.gather(1, idx)
            mask = _self_mask(valid)
            cos, sin = lm.rotary_emb(x, pos)
        cap = _Capture() if (cache is not None or l == cfg.layer - 1) else None
        x_prev, layers_prev = x, layer
        x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cap)
        if cache is not None:
            cache.store(l, b, [(rows, cap, valid)])
    x = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]
    if cache is not None:
        cache.next_pos = attention_mask.long().sum(1)
    return lm.lm_head(lm.norm(x)), kept
