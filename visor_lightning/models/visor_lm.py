"""VisorLanguageModel: the host LLM's own decoder layers run under a VISOR layer schedule (method note, Eq. 3).

The input is the host model's interleaved sequence (text embeddings with the visual tokens at the image
placeholders). It is split into a text stream T and a visual stream V that keep their original positions:

* SA layer (for the samples whose configuration runs it): the host layer over the re-interleaved [V; T] with the
  host's causal mask and RoPE positions, so "every layer SA" *is* the host model; V is refined.
* CA layer: T = layer_text(CA(T, V)), the CA block reading the latest V (text at position p sees visual tokens
  before p); V unchanged.
* any other layer (and SA layers a sample skips): layer_text(T), causal over text only, same positions.

Samples in a batch may run different SA sets; each layer runs its SA rows and its text rows as two sub-batches,
which equals running the samples one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .cache import VisorCache, _Capture
from .cross_attention import CrossAttentionBlock
from .schedule import LayerSchedule


@dataclass
class Streams:
    """Index bookkeeping to split an interleaved sequence into text and visual streams and back."""

    text_idx: torch.Tensor  # [B, Nt] position in the sequence, or N for an unused slot
    vis_idx: torch.Tensor  # [B, Nv] idem
    text_valid: torch.Tensor  # [B, Nt] real, non-padding text token
    vis_valid: torch.Tensor  # [B, Nv] real visual token
    full_valid: torch.Tensor  # [B, N] attention mask
    full_pos: torch.Tensor  # [B, N] RoPE positions
    text_pos: torch.Tensor  # [B, Nt]
    last_text: torch.Tensor  # [B] slot of each row's last text token (generation reads its logits)

    @classmethod
    def split(cls, is_visual: torch.Tensor, attention_mask: torch.Tensor | None = None) -> "Streams":
        """``attention_mask`` None: every position is real."""
        b, n = is_visual.shape
        dev = is_visual.device
        attn = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_visual, dtype=torch.bool)
        n_text = (~is_visual).sum(1)
        n_vis = is_visual.sum(1)
        nt, nv = int(n_text.max()), int(n_vis.max())
        # stable sort puts each kind first in its original order
        text_order = torch.sort(is_visual.to(torch.int8), dim=1, stable=True).indices[:, :nt]
        vis_order = torch.sort((~is_visual).to(torch.int8), dim=1, stable=True).indices[:, :nv]
        text_real = torch.arange(nt, device=dev)[None] < n_text[:, None]
        vis_real = torch.arange(nv, device=dev)[None] < n_vis[:, None]
        text_idx = torch.where(text_real, text_order, n)
        vis_idx = torch.where(vis_real, vis_order, n)
        full_pos = (attn.long().cumsum(1) - 1).clamp_min(0)
        pad = lambda t, fill: torch.cat([t, t.new_full((b, 1), fill)], dim=1)  # noqa: E731
        return cls(
            text_idx=text_idx,
            vis_idx=vis_idx,
            text_valid=pad(attn, False).gather(1, text_idx) & text_real,
            vis_valid=pad(attn, False).gather(1, vis_idx) & vis_real,
            full_valid=attn,
            full_pos=full_pos,
            text_pos=pad(full_pos, 0).gather(1, text_idx),
            last_text=(n_text - 1).clamp_min(0),
        )

    @staticmethod
    def take(x_full: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[B, N, d] -> the stream [B, N*, d] at ``idx`` (unused slots read zeros)."""
        ext = torch.cat([x_full, x_full.new_zeros(x_full.shape[0], 1, x_full.shape[2])], dim=1)
        return ext.gather(1, idx[..., None].expand(-1, -1, x_full.shape[2]))

    def apart(self, x_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The interleaved [B, N, d] sequence -> its (text, visual) streams."""
        return Streams.take(x_full, self.text_idx), Streams.take(x_full, self.vis_idx)

    @staticmethod
    def merge(text: torch.Tensor, vis: torch.Tensor, text_idx: torch.Tensor, vis_idx: torch.Tensor, n: int) -> torch.Tensor:
        """Streams back into the interleaved [B, N, d] sequence (unused slots land in a dropped extra row)."""
        b, _, d = text.shape
        ext = text.new_zeros(b, n + 1, d)
        ext = ext.scatter(1, text_idx[..., None].expand(-1, -1, d), text)
        ext = ext.scatter(1, vis_idx[..., None].expand(-1, -1, d), vis)
        return ext[:, :n]


def _self_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] key validity -> [B, 1, S, S] causal mask (a row may always see itself, so no row is empty)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None])[:, None]


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]``, without the copy when ``rows`` is the whole batch (in order, as ``nonzero`` gives it)."""
    return x if len(rows) == x.shape[0] else x[rows]


def _rows_set(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``x[rows] = values`` (autograd-safe); the whole batch is a plain replacement."""
    return values if len(rows) == x.shape[0] else x.index_copy(0, rows, values)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, Nt, vocab] per text slot, [B, vocab] for the last text token, [M, vocab] for
    # the M slots ``logits_at`` selects, None if policy_only
    streams: Streams
    config_ids: torch.Tensor  # [B] the configuration each sample ran
    policy_logits: torch.Tensor | None
    layer_calls: dict[str, int]  # executed (layer, role) sub-batch calls, for tests and budget logging


class VisorLanguageModel(nn.Module):
    """The host LLM's embeddings, decoder layers, final norm and LM head, plus one new CA block per CA layer."""

    def __init__(self, host: nn.Module, lm_head: nn.Module, schedule: LayerSchedule) -> None:
        super().__init__()
        cfg = host.config
        if schedule.num_layers != cfg.num_hidden_layers:
            raise ValueError(f"schedule has {schedule.num_layers} layers, the host LLM has {cfg.num_hidden_layers}")
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("host LLM uses sliding-window attention, which VISOR's masks do not implement")
        # VISOR passes explicit boolean masks (per-stream causal + padding), which only SDPA takes as they are:
        # eager would add a bool mask, flash-attention-2 takes none. SDPA picks flash/efficient kernels on GPU.
        cfg._attn_implementation = "sdpa"
        self.config = cfg
        self.schedule = schedule
        self.embed_tokens = host.embed_tokens
        self.layers = host.layers
        self.norm = host.norm
        self.rotary_emb = host.rotary_emb
        self.lm_head = lm_head
        self.ca_blocks = nn.ModuleDict(
            {
                str(l): CrossAttentionBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
                for l in schedule.ca_layers
            }
        )

    # ---- prefill ------------------------------------------------------------------------------------
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        is_visual: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        config_ids: torch.Tensor | None = None,
        policy: nn.Module | None = None,
        route: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: VisorCache | None = None,
        last_only: bool = False,
        policy_only: bool = False,
        logits_at: torch.Tensor | None = None,
        streams: Streams | None = None,
    ) -> LMOutput:
        """Prefill over an interleaved sequence.

        ``config_ids`` [B] picks each sample's feasible configuration; without it, ``policy`` decides in front of
        the router layer (``route`` maps its logits to ids, argmax by default); with neither, the maximal one.
        ``policy_only`` stops at the router (logits None): every configuration shares the layers before it, so
        policy training need not run the rest. ``logits_at`` [B, Nt] (text slots) computes the final norm and LM
        head only where it is True (a training loss reads a few answer tokens per sample): logits [M, vocab].
        ``streams``: the split of this input when the caller already made it.
        """
        if policy_only and (policy is None or self.schedule.router_layer is None or config_ids is not None):
            raise ValueError("policy_only needs a policy, no config_ids, and a schedule with a router layer")
        sch = self.schedule
        b, n, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        st = streams if streams is not None else Streams.split(is_visual, attention_mask)
        if config_ids is None and (policy is None or sch.router_layer is None):
            config_ids = torch.full((b,), sch.full_config, dtype=torch.long, device=dev)
        active = sch.active_mask(config_ids) if config_ids is not None else None
        policy_logits = None

        text = Streams.take(inputs_embeds, st.text_idx)
        vis = Streams.take(inputs_embeds, st.vis_idx)
        text_mask = _self_mask(st.text_valid)
        full_mask = _self_mask(st.full_valid)
        ca_mask = st.vis_valid[:, None, :] & (st.vis_idx[:, None, :] < st.text_idx[:, :, None])
        cos_t, sin_t = self.rotary_emb(text, st.text_pos)
        cos_f, sin_f = self.rotary_emb(text, st.full_pos)
        calls: dict[str, int] = {}
        full_x: torch.Tensor | None = None  # the interleaved sequence while every row runs SA (no split/merge)

        for l, layer in enumerate(self.layers):
            role = sch.role(l)
            if l == sch.router_layer and active is None:
                if full_x is not None:
                    (text, vis), full_x = st.apart(full_x), None
                policy_logits = policy(text, st.text_valid, vis, st.vis_valid)
                if policy_only:
                    return LMOutput(None, st, policy_logits.argmax(-1), policy_logits, calls)
                config_ids = (route or (lambda z: z.argmax(-1)))(policy_logits)
                active = sch.active_mask(config_ids)
            if role == "sa":
                rows_sa = active[:, l] if active is not None else torch.full((b,), l in sch.always_on_sa, device=dev)
            else:
                rows_sa = torch.zeros(b, dtype=torch.bool, device=dev)
            sa_idx = rows_sa.nonzero().flatten()
            tx_idx = (~rows_sa).nonzero().flatten()
            if full_x is not None and len(sa_idx) < b:  # the run of layers every row runs as SA ends here
                (text, vis), full_x = st.apart(full_x), None
            if role == "ca":
                block = self.ca_blocks[str(l)]
                k, v = block.visual_kv(vis)
                text = block(text, k, v, ca_mask)
                calls[f"{l}:ca"] = calls.get(f"{l}:ca", 0) + 1
                if cache is not None:
                    cache.ca_kv[l] = (k.detach(), v.detach())
            parts = []
            if len(sa_idx) == b:  # every row: run on the interleaved sequence, split again only when needed
                cap = _Capture() if cache is not None else None
                if full_x is None:
                    full_x = Streams.merge(text, vis, st.text_idx, st.vis_idx, n)
                full_x = layer(full_x, attention_mask=full_mask, position_embeddings=(cos_f, sin_f), past_key_values=cap)
                parts.append((sa_idx, cap, st.full_valid))
                calls[f"{l}:sa"] = calls.get(f"{l}:sa", 0) + 1
            elif len(sa_idx):
                cap = _Capture() if cache is not None else None
                r = sa_idx
                full = Streams.merge(text[r], vis[r], st.text_idx[r], st.vis_idx[r], n)
                out = layer(full, attention_mask=full_mask[r], position_embeddings=(cos_f[r], sin_f[r]), past_key_values=cap)
                text = _rows_set(text, r, Streams.take(out, st.text_idx[r]))
                vis = _rows_set(vis, r, Streams.take(out, st.vis_idx[r]))
                parts.append((r, cap, st.full_valid[r]))
                calls[f"{l}:sa"] = calls.get(f"{l}:sa", 0) + 1
            if len(tx_idx):
                cap = _Capture() if cache is not None else None
                r = tx_idx
                out = layer(_rows(text, r), attention_mask=_rows(text_mask, r),
                            position_embeddings=(_rows(cos_t, r), _rows(sin_t, r)), past_key_values=cap)
                text = _rows_set(text, r, out)
                parts.append((r, cap, _rows(st.text_valid, r)))
                calls[f"{l}:text"] = calls.get(f"{l}:text", 0) + 1
            if cache is not None:
                cache.store(l, b, parts)

        if full_x is not None:
            text = Streams.take(full_x, st.text_idx)
        if cache is not None:
            cache.visual_valid = st.vis_valid
            cache.next_pos = st.full_valid.long().sum(1)
            cache.config_ids = config_ids
        if last_only:
            text = text.gather(1, st.last_text[:, None, None].expand(-1, 1, text.shape[2]))[:, 0]
        elif logits_at is not None:
            text = text[logits_at]
        logits = self.lm_head(self.norm(text))
        return LMOutput(logits, st, config_ids, policy_logits, calls)

    # ---- decode -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: VisorCache) -> torch.Tensor:
        """One new text token per row [B] -> next-token logits [B, vocab], reading and extending ``cache``."""
        x = self.embed_tokens(input_ids[:, None])
        cos, sin = self.rotary_emb(x, cache.next_pos[:, None])
        for l, layer in enumerate(self.layers):
            if str(l) in self.ca_blocks:
                k, v = cache.ca_kv[l]
                x = self.ca_blocks[str(l)](x, k, v, cache.visual_valid[:, None, :])
            mask = cache.decode_mask(l)
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache)
        cache.next_pos = cache.next_pos + 1
        return self.lm_head(self.norm(x[:, -1]))
