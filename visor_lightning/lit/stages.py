"""The training stages (method note, section 3), each a LightningModule over the same ``VisorModel``.

0. ``DenseBase``: a from-scratch dense LLaVA-OV-shaped model (only the embedded demo needs this: no pretrained
   LLaVA-OV can be downloaded here). Exported as a transformers LLaVA-OneVision directory.
1. ``CAPretrain``: the host is frozen; only the new CA blocks and the positional conv train.
2. ``FullFinetune``: configurable parts train (default: everything but the policy), maximal configuration.
3. ``Universal``: find the feasible configurations, then train sampling one per step (or per sample).
4. ``PolicyTraining``: the backbone is frozen; the policy learns to pick a configuration per sample, from
   pseudo-labels (the paper), under a compute budget (Gumbel-softmax straight-through), or as a router that
   predicts each configuration's correctness and is steered at inference by one knob (``max_acc_drop``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from visor_lightning.models import LayerSchedule
from visor_lightning.models.policy import correctness_loss

from .module import POLICY, VisorLitModule


def answer_scores_per_config(model, batch: dict[str, Any], configs) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(answer loss [B], answer-token accuracy [B], fraction of answers wholly right [B]) for each configuration
    id, teacher-forced. The images are encoded once; only the language model runs per configuration."""
    embeds, is_vis = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
    bs = embeds.shape[0]
    out = []
    for c in configs:
        lm = model.lm(embeds, is_vis, batch["attention_mask"], config_ids=torch.full((bs,), c, device=embeds.device))
        targets = model.text_targets(batch["labels"], lm.streams.text_idx)
        out.append((*model.answer_scores(lm.logits, targets), model.answers_correct(lm.logits, targets)))
    return out


class DenseBase(VisorLitModule):
    """Stage 0: every layer is SA (the host model itself), no CA blocks; the positional conv stays zero so the
    result is exactly a LLaVA-OneVision model."""

    stage = "base"
    default_parts = ("vision", "connector", "lm")

    @classmethod
    def schedule_for(cls, spec, cfg) -> LayerSchedule:
        return LayerSchedule.dense(spec.text.num_layers)


class CAPretrain(VisorLitModule):
    """Stage 1: only the new CA blocks and the conditional positional embedding train."""

    stage = "ca_pretrain"
    default_parts = ("ca", "cpe")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extra = set(self.train_parts) - {"ca", "cpe"}
        if extra:
            raise ValueError(f"CA pre-training trains only ca and cpe; train_parts also names {sorted(extra)}")
        new = sum(p.numel() for n, p in self.model.named_parameters() if n.startswith(("lm.ca_blocks.", "connector.cpe.")))
        if self.num_trainable() != new:  # the frozen host must stay exactly LLaVA-OV
            raise AssertionError(f"stage 1 trains {self.num_trainable()} parameters, the CA blocks + conv have {new}")


class FullFinetune(VisorLitModule):
    """Stage 2: the maximal configuration, with ``train_parts`` choosing what trains."""

    stage = "full_finetune"
    default_parts = ("vision", "connector", "cpe", "ca", "lm")


class Universal(VisorLitModule):
    """Stage 3: one set of weights for every budget.

    Args (beyond the base):
        search: find the feasible set first (evaluate the maximal model with subsets of optional SA layers
            off on the validation sets; keep those whose answer-token accuracy is >= ``tolerance`` x the
            maximal one's). Off: use the schedule's feasible set as given.
        tolerance: see ``search``; 0 keeps every candidate (the scores are still measured and reported).
        search_batches: validation batches per set used by the search.
        sample_per: draw a configuration per optimisation "step" (the paper) or per "sample".
        seed: the configuration draw is seeded by (seed, step), the same on every rank.
    """

    stage = "universal"
    default_parts = ("vision", "connector", "cpe", "ca", "lm")
    default_eval = "all"

    def __init__(
        self,
        *args: Any,
        search: bool = True,
        tolerance: float = 0.9,
        search_batches: int = 4,
        sample_per: Literal["step", "sample"] = "step",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0 <= tolerance <= 1:
            raise ValueError(f"model.tolerance must be in [0, 1], got {tolerance}")
        self.search_result: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Search before checkpoint restore and optimizer set-up, so a resumed run has the same policy size."""
        if stage == "fit" and self.hparams.search and self.search_result is None:
            self.search_result = self.find_feasible()

    def candidate_schedule(self) -> LayerSchedule:
        s = self.schedule
        opt = s.optional_sa
        feas = [tuple(sorted(set(s.always_on_sa) | set(c))) for k in range(len(opt) + 1) for c in itertools.combinations(opt, k)]
        return LayerSchedule(s.num_layers, s.ca_layers, s.sa_layers, s.always_on_sa, tuple(feas))

    @torch.no_grad()
    def find_feasible(self) -> dict[str, Any]:
        root = Path(self.trainer.default_root_dir)
        cached = root / "feasible.json"
        if cached.is_file():  # a resumed run reuses its own search
            result = json.loads(cached.read_text())
        else:
            result = self._search()
            if self.trainer.is_global_zero:
                root.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(result, indent=2))
        s = self.schedule
        self.set_schedule(LayerSchedule(s.num_layers, s.ca_layers, s.sa_layers, s.always_on_sa,
                                        tuple(tuple(c) for c in result["feasible"])))
        print(f"[universal] feasible configurations (tolerance {self.hparams.tolerance}): {self.schedule.names}")
        return result

    def _search(self) -> dict[str, Any]:
        cand = self.candidate_schedule()
        self.set_schedule(cand)
        dm = self.trainer.datamodule
        dm.setup("validate")
        device = self.trainer.strategy.root_device
        self.model.to(device)
        was_training = self.model.training
        self.model.eval()
        hits = torch.zeros(len(cand.feasible), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for loader in dm.val_dataloader():
            for batch in itertools.islice(loader, self.hparams.search_batches):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                for c, (_, acc, _) in enumerate(answer_scores_per_config(self.model, batch, range(len(cand.feasible)))):
                    hits[c] += acc.sum()
                count += batch["input_ids"].shape[0]
        self.model.train(was_training)
        hits = self.trainer.strategy.reduce(hits, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        score = (hits / count.clamp_min(1)).tolist()
        best = score[cand.full_config]
        keep = [c for c, sc in zip(cand.feasible, score) if sc >= self.hparams.tolerance * best]
        if cand.feasible[cand.full_config] not in keep:
            keep.append(cand.feasible[cand.full_config])
        return {"candidates": {n: sc for n, sc in zip(cand.names, score)}, "full": cand.names[cand.full_config],
                "tolerance": self.hparams.tolerance, "samples": int(count), "feasible": [list(c) for c in keep]}

    def config_for_step(self, step: int, batch_size: int) -> torch.Tensor:
        """The configuration ids of optimisation step ``step``: uniform over the feasible set, seeded by
        (seed, step), so every rank draws the same and a resumed run draws what the lost one would have."""
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step)
        n = batch_size if self.hparams.sample_per == "sample" else 1
        return torch.randint(len(self.schedule.feasible), (n,), generator=g).expand(batch_size)

    def train_config_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.config_for_step(self.global_step, batch["input_ids"].shape[0]).to(self.device)


class PolicyTraining(VisorLitModule):
    """Stage 4: the backbone is frozen; the policy (before the first optional SA layer) learns to choose.

    Args (beyond the base):
        objective: "pseudo_label" (the paper: per sample, the cheapest configuration whose answer-token accuracy
            is >= ``label_threshold`` x the maximal one's; cross-entropy), "budget" (task loss of the chosen
            configuration via Gumbel-softmax straight-through, plus ``budget_weight`` x the squared relative
            gap between the batch's mean prefill cost of the argmax choices, straight-through, and
            ``1 / target_savings`` of dense) or "correctness" (a router: one logit per configuration, binary
            cross-entropy against the fraction of the sample's answers that configuration gets wholly right,
            from the same teacher-forced passes as the pseudo-labels; at inference the ``max_acc_drop`` knob
            picks, see models/policy.py).
        label_threshold: pseudo_label objective: the fraction of the maximal configuration's accuracy that counts
            as good enough.
        target_savings: budget objective: the average prefill-FLOPs saving vs dense to aim for.
        budget_weight: budget objective: weight of the budget term against the task loss.
        gumbel_tau: Gumbel-softmax temperature.
    """

    stage = "policy"
    default_parts = ("policy",)
    default_eval = "all"

    def __init__(
        self,
        *args: Any,
        objective: Literal["pseudo_label", "budget", "correctness"] = "pseudo_label",
        label_threshold: float = 0.99,
        target_savings: float | None = None,
        budget_weight: float = 10.0,
        gumbel_tau: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if set(self.train_parts) != {"policy"}:
            raise ValueError(f"policy training freezes the backbone: train_parts must be [policy], got {self.train_parts}")
        if self.schedule.router_layer is None:
            raise ValueError(f"schedule {self.schedule.describe()} has one feasible configuration: nothing to choose")
        if objective == "budget" and (target_savings is None or target_savings <= 1):
            raise ValueError("objective 'budget' needs model.target_savings > 1 (e.g. 6.0: one sixth of dense FLOPs)")

    def on_fit_start(self) -> None:
        """Training decides what the head's logits mean (saved as visor.json's policy_head). Only training: weights
        loaded to be evaluated or validated keep the head they were trained with, whatever this config's objective."""
        self.model.policy.head = "correctness" if self.hparams.objective == "correctness" else "choice"
        self.model.policy.trained = True

    def eval_targets(self) -> list[str]:
        targets = super().eval_targets()
        return targets if POLICY in targets else targets + [POLICY]

    def per_config(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen backbone, every configuration: answer loss [K, B], answer-token accuracy [K, B], the fraction of
        answers wholly right [K, B] (teacher-forced on the whole conversation) and the relative prefill cost vs
        dense [B, K] of the *prompt*, which is what inference prefills (multi-turn answers are not part of it)."""
        bs, k = batch["input_ids"].shape[0], len(self.schedule.feasible)
        losses, accs, rights, costs = [], [], [], []
        with torch.no_grad():
            scores = answer_scores_per_config(self.model, batch, range(k))
            for c in range(k):
                ids = torch.full((bs,), c, device=self.device)
                loss, acc, right = scores[c]
                losses.append(loss)
                accs.append(acc)
                rights.append(right)
                f, d = self.flops_per_sample(batch["prompt_ids"], batch["prompt_mask"], ids, routed=True)
                costs.append((f / d).to(self.device, torch.float32))
        return torch.stack(losses), torch.stack(accs), torch.stack(rights), torch.stack(costs, dim=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        losses, accs, rights, cost = self.per_config(batch)
        # the policy sees what it sees at inference: the prompt (no answers of earlier turns leak in)
        logits = self.model.policy_logits(batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"])
        bs = logits.shape[0]
        if h.objective == "pseudo_label":
            full = accs[self.schedule.full_config]
            ok = accs >= h.label_threshold * full[None]  # [K, B]; the full configuration always qualifies
            labels = torch.where(ok.T, cost, torch.full_like(cost, float("inf"))).argmin(1)
            loss = F.cross_entropy(logits, labels)
            chosen = labels
            self.log("train/label_mean_cost", cost.gather(1, labels[:, None]).mean(), batch_size=bs)
        elif h.objective == "correctness":
            # [B, K]: the fraction of the sample's answers each configuration gets wholly right (answer-token accuracy
            # would credit a wrong one-word answer with its end-of-turn token: 0.5, not 0)
            target = rights.T
            loss = correctness_loss(logits, target)
            chosen = self.model.router()(logits.detach())  # what the default knob (0) would run
            self.log("train/router_abs_err", (logits.detach().sigmoid() - target).abs().mean(), batch_size=bs)
        else:
            # the task term explores (Gumbel noise); the budget term prices the noise-free argmax, i.e. exactly
            # what inference will choose (a budget met only in expectation over noise collapses at argmax)
            y = F.gumbel_softmax(logits, tau=h.gumbel_tau, hard=True)
            soft = F.softmax(logits / h.gumbel_tau, dim=-1)
            y_det = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(soft) - soft.detach() + soft
            task = (y * losses.T).sum(1).mean()
            mean_cost = (y_det * cost).sum(1).mean()
            target = 1.0 / h.target_savings
            penalty = ((mean_cost - target) / target) ** 2
            loss = task + h.budget_weight * penalty
            chosen = y.argmax(1)
            self.log_dict({"train/task_loss": task, "train/mean_cost": mean_cost, "train/budget_penalty": penalty,
                           "train/target_cost": target}, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_flops("train", batch["prompt_ids"], batch["prompt_mask"], chosen, routed=True)
        return loss
