"""VisorModel = vision encoder + connector + VISOR language backbone + policy, built on LLaVA-OneVision parts.

The four parts are separate modules (``vision``, ``connector``, ``lm``, ``policy``) so training stages can
freeze or train each one. The host parts are transformers' own modules taken out of a
``LlavaOnevisionForConditionalGeneration``; :meth:`VisorModel.original_key` maps every one of their parameters
back to its checkpoint key, and :meth:`VisorModel.new_parameters` lists what VISOR adds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache import VisorCache
from .connector import Connector
from .fastv import FastVConfig, fastv_prefill
from .policy import Policy
from .schedule import LayerSchedule, ScheduleConfig
from .spec import BackboneSpec
from .vision import VisionEncoder
from .visor_lm import LMOutput, Streams, VisorLanguageModel

# our module prefix -> key in a LLaVA-OneVision checkpoint file (the layout transformers' save_pretrained writes
# and the published llava-onevision-*-hf checkpoints use; transformers maps older variants itself on load)
_ORIGINAL_PREFIXES = (
    ("vision.tower.", "vision_tower."),
    ("connector.projector.", "multi_modal_projector."),
    ("connector.image_newline", "image_newline"),
    ("lm.embed_tokens.", "language_model.model.embed_tokens."),
    ("lm.layers.", "language_model.model.layers."),
    ("lm.norm.", "language_model.model.norm."),
    ("lm.lm_head.", "language_model.lm_head."),
)
_NEW_PREFIXES = ("lm.ca_blocks.", "connector.cpe.", "policy.")


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows -> left-padded (input_ids [B, N], attention_mask [B, N]), the layout generate() needs."""
    n = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_full((n - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(n - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows])
    return ids, mask


@dataclass
class LoadReport:
    """What :meth:`VisorModel.from_llava_onevision` did: loaded original tensors, and the new VISOR weights."""

    path: str
    loaded: int
    new: list[str] = field(default_factory=list)
    new_params: int = 0
    missing_in_checkpoint: list[str] = field(default_factory=list)
    unexpected_in_checkpoint: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {self.loaded} original tensors from {self.path}; new VISOR weights: {len(self.new)} tensors "
            f"({self.new_params / 1e6:.2f}M params: CA blocks, positional conv, policy)"
        )


@dataclass
class VisorOutput:
    logits: torch.Tensor | None  # None under loss_only
    loss: torch.Tensor | None
    lm: LMOutput


class VisorModel(nn.Module):
    def __init__(
        self,
        backbone: BackboneSpec,
        schedule: ScheduleConfig | LayerSchedule | None = None,
        policy_width: int = 256,
        host: nn.Module | None = None,
    ) -> None:
        """``host`` is a LlavaOnevisionForConditionalGeneration to take parts from; random init if None."""
        super().__init__()
        from transformers import LlavaOnevisionForConditionalGeneration

        self._image_features: dict[tuple[int, int], tuple] | None = None  # see reuse_image_features

        if host is None:
            cfg = backbone.to_hf_config()
            cfg.text_config._attn_implementation = "sdpa"
            cfg.vision_config._attn_implementation = "sdpa"
            host = LlavaOnevisionForConditionalGeneration(cfg)
        self.backbone = backbone
        sched = schedule if isinstance(schedule, LayerSchedule) else LayerSchedule.build(backbone.text.num_layers, schedule)
        self.schedule = sched
        inner = host.model
        self.vision = VisionEncoder(inner.vision_tower, backbone.vision.feature_layer)
        self.connector = Connector(
            inner.multi_modal_projector,
            inner.image_newline,
            image_size=backbone.vision.image_size,
            patch_size=backbone.vision.patch_size,
            grid_pinpoints=backbone.pinpoints(),
            vision_aspect_ratio=backbone.vision_aspect_ratio,
            pool=backbone.pool_shape,
        )
        self.lm = VisorLanguageModel(inner.language_model, host.lm_head, sched)
        self.policy = Policy(backbone.text.hidden_size, len(sched.feasible), policy_width)
        self.image_token_id = backbone.image_token_id

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_llava_onevision(
        cls,
        path: str | Path,
        schedule: ScheduleConfig | LayerSchedule | None = None,
        dtype: torch.dtype = torch.float32,
        policy_width: int = 256,
        token_pool: int = 1,
    ) -> tuple["VisorModel", LoadReport]:
        """Build from a local LLaVA-OneVision directory (``save_pretrained`` layout; nothing is downloaded).

        Original weights load through transformers unchanged; CA blocks, the positional conv and the policy are
        new and reported as such. A checkpoint that lacks original weights is refused. ``token_pool`` turns on
        VISOR-TR's visual-token pooling (see :meth:`set_token_pool`).
        """
        from transformers import LlavaOnevisionForConditionalGeneration

        spec = dataclasses.replace(BackboneSpec.from_pretrained_dir(path), token_pool=token_pool)
        host, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, attn_implementation="sdpa", output_loading_info=True, local_files_only=True
        )
        missing = sorted(info.get("missing_keys", []))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} original weights, e.g. {missing[:5]}")
        model = cls(spec, schedule, policy_width=policy_width, host=host)
        model.to(dtype)
        new = model.new_parameters()
        report = LoadReport(
            path=str(path),
            loaded=sum(1 for n, _ in model.named_parameters() if n not in new),
            new=sorted(new),
            new_params=sum(p.numel() for n, p in model.named_parameters() if n in new),
            unexpected_in_checkpoint=sorted(info.get("unexpected_keys", [])),
        )
        return model, report

    def set_token_pool(self, token_pool: int) -> None:
        """VISOR-TR: average-pool every image's visual grids by this token factor (1 = off) before the LLM.

        No weights change; the spec changes with it, so the collator expands ``<image>`` to the pooled count and
        the FLOPs model prices it.
        """
        self.backbone = dataclasses.replace(self.backbone, token_pool=token_pool)
        self.connector.pool = self.backbone.pool_shape

    def new_parameters(self) -> set[str]:
        """Names of parameters VISOR adds (not in a LLaVA-OneVision checkpoint)."""
        return {n for n, _ in self.named_parameters() if n.startswith(_NEW_PREFIXES)}

    @staticmethod
    def original_key(name: str) -> str | None:
        """Our parameter name -> its LLaVA-OneVision checkpoint key (None for new VISOR weights)."""
        for ours, theirs in _ORIGINAL_PREFIXES:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return None

    # ---- inputs -------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images -> one visual-token sequence per image.

        ``pixel_values`` is [B, C, H, W] (one crop per image) or [B, crops, C, H, W] with ``image_sizes`` [B, 2]
        (height, width) as LLaVA-OV's processor makes them (AnyRes: base crop + tiles; padding crops ignored).
        """
        key = (id(pixel_values), id(image_sizes))
        if self._image_features is not None and key in self._image_features:
            return self._image_features[key][-1]
        if pixel_values.dim() == 4:
            crops = [1] * pixel_values.shape[0]
            flat = pixel_values
            image_sizes = None
        elif pixel_values.dim() == 5:
            if image_sizes is None:
                raise ValueError("image_sizes is required with 5-D pixel_values [B, crops, C, H, W] (AnyRes tiling)")
            if image_sizes.shape != (pixel_values.shape[0], 2):
                raise ValueError(f"image_sizes must be [B, 2] (height, width), got {tuple(image_sizes.shape)}")
            crops = [self.connector.num_crops(tuple(int(x) for x in hw)) for hw in image_sizes]
            if max(crops) > pixel_values.shape[1]:
                raise ValueError(f"pixel_values has {pixel_values.shape[1]} crops per image, image_sizes need {max(crops)}")
            flat = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)], dim=0)
        else:
            raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        feats = self.connector(self.vision(flat), crops, image_sizes)
        if self._image_features is not None:  # the inputs are held too, so their ids stay theirs
            self._image_features[key] = (pixel_values, image_sizes, feats)
        return feats

    @contextlib.contextmanager
    def reuse_image_features(self) -> Iterator[None]:
        """Inside, each image batch (the same tensor objects) goes through the vision tower and connector once:
        evaluation runs several targets (configurations, the policy, FastV) on one batch, and those parts do not
        depend on the target. For inference only: the tensors must not change in place inside, and no gradient
        should flow through reused features."""
        self._image_features = {}
        try:
            yield
        finally:
            self._image_features = None

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids with image placeholders -> (interleaved embeddings [B, N, d], is_visual [B, N])."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, N] batch, got shape {tuple(input_ids.shape)}")
        is_visual = input_ids == self.image_token_id
        if (~is_visual).sum(1).min() == 0:
            raise ValueError("input_ids: every sample needs at least one text token (the prompt is empty)")
        embeds = self.lm.embed_tokens(input_ids.masked_fill(is_visual, 0))
        if pixel_values is None:
            if is_visual.any():
                raise ValueError("input_ids contain image tokens but pixel_values is None")
            return embeds, is_visual
        per_image = self.encode_images(pixel_values, image_sizes)
        counts = is_visual.sum(1).tolist()
        for i, (c, v) in enumerate(zip(counts, per_image)):
            if c != v.shape[0]:
                raise ValueError(
                    f"input_ids row {i} has {c} image tokens but its image gives {v.shape[0]} visual tokens: "
                    "expand the <image> placeholder with the model's processor"
                )
        feats = torch.cat(per_image, dim=0).to(embeds.dtype)
        embeds = embeds.masked_scatter(is_visual[..., None], feats)
        return embeds, is_visual

    # ---- forward / generate -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        config_ids: torch.Tensor | None = None,
        use_policy: bool = False,
        cache: VisorCache | None = None,
        last_only: bool = False,
        max_acc_drop: float | None = None,
        loss_only: bool = False,
    ) -> VisorOutput:
        """Logits per text slot ([B, Nt, vocab]; ``lm.streams.text_idx`` gives their sequence positions).

        ``labels`` [B, N] are aligned with ``input_ids`` as in transformers (-100 = ignore) and shifted here.
        ``loss_only`` (with ``labels``): the LM head runs only on the slots that have a target, and ``logits`` is
        None; the loss is the same (training reads a few answer tokens per sample, not every text token).
        ``max_acc_drop`` is the router's knob (``use_policy`` with a correctness-trained policy; see policy.py).
        """
        if loss_only and labels is None:
            raise ValueError("loss_only needs labels")
        if labels is not None and last_only:
            raise ValueError("labels need logits for every text token: last_only must be False")
        embeds, is_visual = self.embed(input_ids, pixel_values, image_sizes)
        st = Streams.split(is_visual, attention_mask)
        targets = self.text_targets(labels, st.text_idx) if labels is not None else None
        out = self.lm(
            embeds, is_visual, attention_mask, config_ids=config_ids,
            policy=self.policy if use_policy else None, route=self.router(max_acc_drop), cache=cache,
            last_only=last_only, logits_at=(targets != -100) if loss_only else None, streams=st,
        )
        loss = None
        if targets is not None:
            if loss_only:
                loss = nn.functional.cross_entropy(out.logits.float(), targets[targets != -100])
            else:
                loss = nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return VisorOutput(None if loss_only else out.logits, loss, out)

    def policy_logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's logits [B, K] on prompts: only the layers in front of the router run."""
        embeds, is_visual = self.embed(input_ids, pixel_values, image_sizes)
        return self.lm(embeds, is_visual, attention_mask, policy=self.policy, policy_only=True).policy_logits

    def router(self, max_acc_drop: float | None = None):
        """The policy's logits -> configuration ids, at knob ``max_acc_drop`` (None: the policy's default)."""
        self.policy.knob(max_acc_drop)  # a bad value, or a knob for a classifier, fails before any compute
        sa = [len(c) for c in self.schedule.feasible]
        return lambda logits: self.policy.route(logits, sa, self.schedule.full_config, max_acc_drop)

    @staticmethod
    def text_targets(labels: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """Sequence-aligned ``labels`` [B, N] -> next-token targets per text slot [B, Nt] (-100 = ignore)."""
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        ext = torch.cat([shifted, shifted.new_full((shifted.shape[0], 1), -100)], dim=1)
        return ext.gather(1, text_idx)

    @staticmethod
    def answer_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (mean answer-token cross-entropy [B], fraction of answer tokens predicted by argmax [B]).

        Teacher-forced, so one forward scores a configuration on every sample (policy pseudo-labels, search).
        """
        valid = targets != -100
        ce = nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets.clamp_min(0), reduction="none")
        n = valid.sum(1).clamp_min(1)
        loss = (ce * valid).sum(1) / n
        acc = ((logits.argmax(-1) == targets) & valid).sum(1) / n
        return loss, acc

    @staticmethod
    def answers_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per sample [B]: the fraction of its answers (assistant turns: contiguous runs of targets) whose every
        token argmax predicts, teacher-forced. Unlike answer-token accuracy this does not credit a wrong answer
        for its end-of-turn token: a one-word answer that is wrong scores 0, not 0.5."""
        valid = targets != -100
        wrong = valid & (logits.argmax(-1) != targets)
        start = valid & ~torch.cat([valid.new_zeros(valid.shape[0], 1), valid[:, :-1]], dim=1)
        turn = torch.cumsum(start.long(), dim=1) * valid  # 1.. per answer, 0 outside answers
        n_turns = start.sum(1)
        bad = torch.zeros(valid.shape[0], int(turn.max()) + 1, device=targets.device).scatter_add_(1, turn, wrong.float())
        ok = ((bad[:, 1:] == 0) & (torch.arange(1, bad.shape[1], device=targets.device)[None] <= n_turns[:, None])).sum(1)
        return ok / n_turns.clamp_min(1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        config_ids: torch.Tensor | None = None,
        use_policy: bool = False,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        fastv: FastVConfig | None = None,
        max_acc_drop: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding (left-pad batches). Returns (new tokens [B, T], configuration ids [B]).

        With the cache, visual K/V live only in CA blocks (computed once per image) and the SA layers a sample
        runs; without it, every step re-runs the prefill on the grown sequence (the reference for tests).
        ``fastv`` prunes visual tokens FastV-style instead (the dense host model only; see ``fastv.py``): with the
        cache the prompt's prefill picks the kept tokens once, without it every step re-ranks them.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: generation needs left-padded prompts (every row's last token real)")
        cache = VisorCache(self.schedule.num_layers) if use_cache else None

        def prefill(ids: torch.Tensor, mask: torch.Tensor, cache: VisorCache | None, config_ids: torch.Tensor | None):
            if fastv is not None:
                embeds, is_visual = self.embed(ids, pixel_values, image_sizes)
                logits, _ = fastv_prefill(self.lm, embeds, is_visual, mask, fastv, cache)
                return logits, torch.full((b,), self.schedule.full_config, device=ids.device)
            out = self(ids, pixel_values, image_sizes, mask, config_ids=config_ids, use_policy=use_policy,
                       cache=cache, last_only=True, max_acc_drop=max_acc_drop)
            return out.logits, out.lm.config_ids

        logits, config_ids = prefill(input_ids, attention_mask, cache, config_ids)
        tokens: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        ids, mask = input_ids, attention_mask
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if cache is not None:
                logits = self.lm.decode_step(nxt, cache)
            else:
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                logits, _ = prefill(ids, mask, None, config_ids)
        return torch.stack(tokens, dim=1), config_ids
