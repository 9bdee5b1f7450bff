"""The LightningModule every training stage shares: building the model, which parts train, the optimizer, and
evaluation of every configuration (accuracy and FLOPs per sample).

The model itself stays a plain ``VisorModel`` (``self.model``) with its four parts kept separate (``vision``,
``connector``, ``lm``, ``policy``); stages differ only in which parts train and which configuration each step
runs (see ``stages.py``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from visor_lightning.flops import FlopsModel, token_counts
from visor_lightning.models import BackboneSpec, LayerSchedule, ScheduleConfig, VisorModel
from visor_lightning.models.fastv import FastVConfig
from visor_lightning.models.policy import parse_knob_target
from visor_lightning.models.schedule import DENSE
from visor_lightning.optim import adamw

from .metrics import ChoiceCounts, ExactMatch, metric_key, normalize_answer

# Which parameters belong to which part (names as in VisorModel.named_parameters()).
PARTS = ("vision", "connector", "cpe", "ca", "lm", "policy")


# first matching prefix wins (cpe before the rest of the connector, CA blocks before the rest of the LM)
_PART_PREFIXES = (("vision.", "vision"), ("connector.cpe.", "cpe"), ("connector.", "connector"),
                  ("lm.ca_blocks.", "ca"), ("lm.", "lm"), ("policy.", "policy"))


def warmup_cosine(step: int, warmup_steps: int, total: int, min_lr_ratio: float) -> float:
    """The learning-rate factor of every stage: linear warm-up, then cosine decay to ``min_lr_ratio`` at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def part_of(name: str) -> str:
    for prefix, part in _PART_PREFIXES:
        if name.startswith(prefix):
            return part
    raise ValueError(f"parameter {name!r} belongs to no part")


POLICY = "policy"  # evaluation target: the policy picks per sample (a router: at its default knob, 0)


def image_fingerprints(pixels: torch.Tensor) -> list[str]:
    """A short hash of the pixels each sample's model input held: evaluation records show which image an answer saw
    (under the swapped-image control, another one)."""
    import hashlib

    flat = pixels.detach().cpu().contiguous().numpy()
    return [hashlib.sha1(flat[i].tobytes()).hexdigest()[:12] for i in range(len(flat))]


def is_routed(target: str) -> bool:
    """``policy`` and the router at a knob value, ``policy(max_acc_drop=X)``: the policy decides per sample."""
    return target == POLICY or parse_knob_target(target) is not None


class VisorLitModule(pl.LightningModule):
    """Base of the stages.

    Args:
        backbone: model shapes; ``backbone.pretrained`` loads a local LLaVA-OneVision checkpoint.
        schedule: layer roles (CA / SA candidates / feasible configurations).
        policy_width: hidden width of the policy MLP.
        init_from: a previous stage's ``weights/`` directory (model.safetensors + visor.json), or one of its
            checkpoints (a ``.ckpt`` file or a DeepSpeed checkpoint directory, converted to fp32 weights); wins
            over ``backbone``/``schedule``.
        tokenizer_vocab: for a from-scratch backbone, size its vocabulary and ``<image>`` id to this tokenizer.
        train_parts: parts to train, from vision, connector, cpe, ca, lm, policy (the rest is frozen).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warm-up and cosine decay.
        eval_configs: what validation evaluates: "full" (the maximal configuration), "all" (every feasible
            one), or a list of configuration names; None: the stage's default. The policy stage adds the policy.
        max_new_tokens: generation length for evaluation (answers are short).
        expected_trainable: if set, fail unless exactly this many parameters train (a guard for stage 1).
        token_pool: VISOR-TR visual-token pooling factor (1, 2, 4, ...) over whatever the model was built or
            loaded with; None keeps ``backbone.token_pool`` / the handed-over weights' setting.
        compile: ``torch.compile`` each decoder layer, CA block and vision layer (static shapes; pair it with
            ``data.pad_to_multiple_of``). Off by default: measure with ``visor bench train --compile`` first (the CPU
            demo's numbers: docs/science.md, "Throughput").
    """

    stage = "base"
    default_parts: tuple[str, ...] = PARTS
    default_eval = "full"

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        schedule: ScheduleConfig | None = None,
        policy_width: int = 256,
        init_from: str | None = None,
        tokenizer_vocab: str | None = None,
        train_parts: list[str] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        eval_configs: str | list[str] | None = None,
        max_new_tokens: int = 8,
        expected_trainable: int | None = None,
        token_pool: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # under LightningCLI, hparams hold the raw config (plain dicts), so the typed objects are kept here
        self.backbone_cfg, self.schedule_cfg = _as_backbone(backbone), _as_schedule(schedule)
        self.model = self.build_model().train()  # transformers' from_pretrained leaves modules in eval mode
        if compile:
            from visor_lightning.models.compiled import compile_blocks

            compile_blocks(self.model)
        if token_pool is not None:
            self.model.set_token_pool(token_pool)
        parts = list(train_parts) if train_parts is not None else list(self.default_parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"model.train_parts: unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
        self.train_parts = parts
        self.apply_trainable()
        if expected_trainable is not None and self.num_trainable() != expected_trainable:
            raise ValueError(f"{self.stage}: {self.num_trainable()} trainable parameters, expected {expected_trainable}")
        self.eval_results: dict[str, dict[str, dict[str, float]]] = {}
        self.eval_tokens: dict[str, dict[str, float]] = {}  # per val set: mean prompt text / visual tokens
        self.sample_records: list[dict[str, Any]] | None = None  # a list: validation keeps one record per sample
        self.last_layer_calls: dict[str, int] = {}
        self.score_loss = True  # validation also logs the teacher-forced loss (visor eval, which reports none, skips it)
        self._metrics_ready = False

    # ---- model --------------------------------------------------------------------------------------
    def resolve_schedule(self, spec: BackboneSpec) -> LayerSchedule:
        return self.schedule_for(spec, self.schedule_cfg)

    @classmethod
    def schedule_for(cls, spec: BackboneSpec, cfg: ScheduleConfig | None) -> LayerSchedule:
        """The layer schedule this stage trains on ``spec`` (a classmethod: ``visor flops`` asks a config's stage)."""
        return LayerSchedule.build(spec.text.num_layers, cfg)

    def build_model(self) -> VisorModel:
        h = self.hparams
        if h.init_from:
            from .weights import load_weights, weights_dir

            if self.backbone_cfg is not None:
                warnings.warn(f"[{self.stage}] model.backbone is ignored: init_from={h.init_from} brings its own shapes")
            source = weights_dir(h.init_from)  # a weights/ directory, or a .ckpt / DeepSpeed checkpoint converted
            override = self.resolve_schedule(_saved_spec(source)) if self.schedule_cfg is not None else None
            return load_weights(source, override)
        spec = self.backbone_cfg or BackboneSpec()
        if spec.pretrained:  # the checkpoint's config.json gives the shapes; the YAML's are not used
            shapes = BackboneSpec.from_pretrained_dir(spec.pretrained)
            model, report = VisorModel.from_llava_onevision(spec.pretrained, self.resolve_schedule(shapes),
                                                            policy_width=h.policy_width, token_pool=spec.token_pool)
            print(f"[{self.stage}] {report.summary()}")
            return model
        if h.tokenizer_vocab:
            from visor_lightning.data.tokenizer import backbone_for_tokenizer, load_tokenizer

            spec = backbone_for_tokenizer(spec, load_tokenizer(h.tokenizer_vocab))
        return VisorModel(spec, self.resolve_schedule(spec), policy_width=h.policy_width, host=None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry ``visor.json``'s content, so any checkpoint can seed the next stage (``init_from``)."""
        from .weights import weights_meta

        checkpoint["visor"] = weights_meta(self.model)

    @property
    def spec(self) -> BackboneSpec:
        return self.model.backbone

    @property
    def schedule(self) -> LayerSchedule:
        return self.model.schedule

    def set_schedule(self, schedule: LayerSchedule) -> None:
        """Replace the feasible set (same CA/SA layers); the policy head gets one output per configuration."""
        from visor_lightning.models.policy import Policy

        self.model.schedule = schedule
        self.model.lm.schedule = schedule
        if self.model.policy.num_configs != len(schedule.feasible):
            self.model.policy = Policy(self.spec.text.hidden_size, len(schedule.feasible), self.hparams.policy_width)
        self.apply_trainable()

    def apply_trainable(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(part_of(name) in self.train_parts)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def trainable_by_part(self) -> dict[str, int]:
        out = {k: 0 for k in PARTS}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                out[part_of(name)] += p.numel()
        return out

    # ---- training -----------------------------------------------------------------------------------
    def train_config_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """The configuration each sample trains this step: the maximal one (stages override)."""
        return torch.full((batch["input_ids"].shape[0],), self.schedule.full_config, device=self.device)

    def forward_batch(self, batch: dict[str, Any], config_ids: torch.Tensor | None = None):
        """The teacher-forced loss (the LM head runs on the answer tokens only; no logits are returned)."""
        return self.model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"],
                          labels=batch["labels"], config_ids=config_ids, loss_only=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ids = self.train_config_ids(batch)
        out = self.forward_batch(batch, ids)
        self.last_layer_calls = out.lm.layer_calls
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)  # mean over ranks
        self.log_flops("train", batch["input_ids"], batch["attention_mask"], ids, routed=False,
                       image_sizes=batch["image_sizes"])
        return out.loss

    def logging_step(self) -> bool:
        """Whether Lightning writes this step's metrics to the loggers (every ``trainer.log_every_n_steps``). A
        per-step value of any other step reaches no logger, so :meth:`log_flops` skips those steps (the loss is logged
        on every step: the progress lines read the latest, and Lightning wants one ``sync_dist`` per key)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._batch_ids = list(batch.get("id") or [])

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop at a NaN/inf loss before it reaches the weights; every rank stops (the decision is reduced, so no
        rank is left waiting in an all-reduce), naming the step, the samples and the last good checkpoint."""
        from .safety import NonFiniteLossError, nonfinite_message

        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            root = Path(self.trainer.default_root_dir) if self.trainer.default_root_dir else None
            value = float(loss.detach().float().reshape(-1)[0])
            raise NonFiniteLossError(nonfinite_message(value, self.trainer.global_step, getattr(self, "_batch_ids", None),
                                                       root, self.trainer.global_rank))

    def log_flops(self, prefix: str, ids: torch.Tensor, mask: torch.Tensor, config_ids: torch.Tensor, routed: bool,
                  image_sizes: torch.Tensor | None = None) -> None:
        if not self.logging_step():  # a per-step value no logger would receive: not worth its per-sample count
            return
        flops, dense = self.flops_per_sample(ids, mask, config_ids, routed, image_sizes)
        self.log(f"{prefix}/gflops_per_sample", flops.mean() / 1e9, batch_size=len(flops))
        self.log(f"{prefix}/flops_saving", dense.sum() / flops.sum(), batch_size=len(flops))

    def flops_per_sample(self, ids: torch.Tensor, mask: torch.Tensor, config_ids: torch.Tensor, routed: bool,
                         image_sizes: torch.Tensor | None = None):
        """Analytic LLM prefill FLOPs per sample for its configuration, and for the dense host model.

        With VISOR-TR pooling, the dense reference is the unpooled host model (its visual-token count comes from
        ``image_sizes``), so savings are quoted against dense LLaVA-OV as the paper's are.
        """
        nt, nv = self.token_counts(ids, mask)
        nv_dense = nv
        if self.spec.token_pool != 1 and image_sizes is not None:
            unpooled = dataclasses.replace(self.spec, token_pool=1)
            nv_dense = [unpooled.visual_tokens(int(h), int(w)) if v else 0 for (h, w), v in zip(image_sizes.tolist(), nv)]
        fm, dense = self.flops_models()
        feas = self.schedule.feasible
        f = [fm.prefill(feas[c], t, v, routed=routed) for c, t, v in zip(config_ids.tolist(), nt, nv)]
        d = [dense.prefill(None, t, v) for t, v in zip(nt, nv_dense)]
        return torch.tensor(f, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)

    def token_counts(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], list[int]]:
        """(text tokens, visual tokens) per sample of a padded batch."""
        return token_counts(ids, mask, self.spec.image_token_id)

    def flops_models(self) -> tuple[FlopsModel, FlopsModel]:
        key = self.schedule.feasible
        if getattr(self, "_fm_key", None) != key:
            self._fm = (FlopsModel(self.spec, self.schedule, self.hparams.policy_width),
                        FlopsModel(self.spec, LayerSchedule.dense(self.schedule.num_layers)))
            self._fm_key = key
        return self._fm

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.stage}: nothing to train (train_parts={self.train_parts})")
        opt = adamw(params, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, h.warmup_steps, total, h.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- evaluation ---------------------------------------------------------------------------------
    def eval_targets(self) -> list[str]:
        """Names evaluated by validation: configuration names, and ``policy`` where a stage adds it."""
        spec = self.hparams.eval_configs or self.default_eval
        names = self.schedule.names
        if spec == "full":
            return [names[self.schedule.full_config]]
        if spec == "all":
            return list(names)
        fastv = [n for n in spec if FastVConfig.parse(n) is not None]
        knobs = [n for n in spec if parse_knob_target(n) is not None]
        if knobs and self.model.policy.head != "correctness":
            raise ValueError(f"model.eval_configs: {knobs} set the router's max_acc_drop knob, but this policy is a "
                             f"{self.model.policy.head!r} head (train one with PolicyTraining objective: correctness)")
        bad, why = [], ""
        for n in spec:
            if not is_routed(n) and n not in fastv:
                try:
                    self.schedule.index(n)
                except ValueError as e:
                    bad.append(n)
                    why = f" ({e})" if n == DENSE else why
        if bad:
            raise ValueError(f"model.eval_configs: {bad} are not feasible; feasible: {names}{why} "
                             "(or the FastV peer on a dense model: fastv(k=K,r=R))")
        spec = [n if is_routed(n) or n in fastv else self.schedule.canonical(n) for n in spec]
        if fastv and self.schedule.ca_layers:
            raise ValueError(f"model.eval_configs: {fastv} prune the dense host model; this model has CA layers "
                             "(evaluate FastV on the dense base stage's weights)")
        return list(spec)

    def val_set_names(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        names = list(getattr(dm, "val_names", []) or [])
        return names or ["val"]

    def _setup_metrics(self) -> None:
        """One exact-match and one FLOPs metric per (val set, target); states sum over ranks."""
        if self._metrics_ready:
            return
        self.em = torch.nn.ModuleDict()
        self.flops_mean = torch.nn.ModuleDict()
        self.dense_mean = torch.nn.ModuleDict()
        self.val_loss = torch.nn.ModuleDict()
        self.choice = torch.nn.ModuleDict()
        self.tokens_mean = torch.nn.ModuleDict()  # mean prompt (text, visual) tokens: what the FLOPs are quoted at
        for s in self.val_set_names():
            self.dense_mean[s] = MeanMetric()
            self.tokens_mean[f"{s}|text"] = MeanMetric()
            self.tokens_mean[f"{s}|visual"] = MeanMetric()
            self.val_loss[s] = MeanMetric()
            for t in self.eval_targets():
                k = _metric_slot(s, t)
                self.em[k] = ExactMatch()
                self.flops_mean[k] = MeanMetric()
                if is_routed(t):
                    self.choice[k] = ChoiceCounts(len(self.schedule.feasible))
        self.to(self.device)
        self._metrics_ready = True

    def on_validation_start(self) -> None:
        self._setup_metrics()

    def on_test_start(self) -> None:
        self._metrics_ready = False  # the test sets are other sets than validation's
        self._setup_metrics()

    def _tokenizer(self):
        return self.trainer.datamodule.encoder.tok

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        s = self.val_set_names()[dataloader_idx]
        tok = self._tokenizer()
        bs = batch["input_ids"].shape[0]
        full = torch.full((bs,), self.schedule.full_config, device=self.device)
        if self.score_loss:
            self.val_loss[s].update(self.forward_batch(batch, full).loss)
        _, dense = self.flops_per_sample(batch["prompt_ids"], batch["prompt_mask"], full, routed=False,
                                         image_sizes=batch["image_sizes"])
        self.dense_mean[s].update(dense)
        nt, nv = self.token_counts(batch["prompt_ids"], batch["prompt_mask"])
        self.tokens_mean[f"{s}|text"].update(torch.tensor(nt, dtype=torch.float64))
        self.tokens_mean[f"{s}|visual"].update(torch.tensor(nv, dtype=torch.float64))
        memo: dict[Any, Any] = {}  # this batch's answers per configuration id, for the router's knob targets
        with self.model.reuse_image_features():
            for t in self.eval_targets():
                self._score_target(s, t, batch, tok, nt, nv, dense, memo)

    def _generate_config(self, batch: dict[str, Any], tok, cid: int, memo: dict[Any, Any]) -> list[str]:
        """The whole batch's answers under configuration ``cid`` (once per batch: ``memo``)."""
        if cid not in memo:
            bs = batch["input_ids"].shape[0]
            tokens, _ = self.model.generate(
                batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"],
                max_new_tokens=self.hparams.max_new_tokens, config_ids=torch.full((bs,), cid, device=self.device),
                eos_token_id=tok.eos_token_id)
            memo[cid] = tok.batch_decode(tokens, skip_special_tokens=True)
        return memo[cid]

    def router_logits(self, batch: dict[str, Any], memo: dict[Any, Any] | None = None) -> torch.Tensor:
        """The policy's logits [B, K] on the batch's prompts (the layers before the router run once)."""
        if memo is not None and "logits" in memo:
            return memo["logits"]
        logits = self.model.policy_logits(batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"])
        if memo is not None:
            memo["logits"] = logits
        return logits

    def _score_target(self, s: str, t: str, batch: dict[str, Any], tok, nt: list[int], nv: list[int],
                      dense: torch.Tensor, memo: dict[Any, Any] | None = None) -> None:
        """Generate the answers of one evaluation target on one batch and update its metrics and records.

        The router at a knob value, ``policy(max_acc_drop=X)``, decides from one policy pass; each sample's answer
        is then its chosen configuration's answer (each configuration runs once per batch, however many knob
        values are scored: a sweep costs one pass per configuration). VISOR runs each sample's configuration as
        its own sub-batch, so this equals routed generation (tests/test_router.py checks it against ``policy``).
        """
        bs = batch["input_ids"].shape[0]
        memo = {} if memo is None else memo
        knob, fastv = parse_knob_target(t), FastVConfig.parse(t)
        use_policy = t == POLICY
        p_correct = None
        if knob is not None:
            logits = self.router_logits(batch, memo)
            chosen = self.model.router(knob)(logits)
            answers = {c: self._generate_config(batch, tok, c, memo) for c in chosen.unique().tolist()}
            preds = [answers[c][i] for i, c in enumerate(chosen.tolist())]
            p_correct = self.model.policy.predicted_correctness(logits).gather(1, chosen[:, None])[:, 0]
        elif not use_policy and not fastv:
            cid = self.schedule.index(t)
            preds = self._generate_config(batch, tok, cid, memo)
            chosen = torch.full((bs,), cid, device=self.device)
        else:
            tokens, chosen = self.model.generate(
                batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"],
                max_new_tokens=self.hparams.max_new_tokens, use_policy=use_policy,
                eos_token_id=tok.eos_token_id, fastv=fastv,
            )
            preds = tok.batch_decode(tokens, skip_special_tokens=True)
            if use_policy and self.model.policy.head == "correctness":
                p_correct = self.model.policy.predicted_correctness(self.router_logits(batch, memo)).gather(1, chosen[:, None])[:, 0]
        routed = use_policy or knob is not None
        k = _metric_slot(s, t)
        self.em[k].update(preds, batch["answer"])
        if fastv:
            dense_fm = self.flops_models()[1]
            flops = torch.tensor([dense_fm.fastv_prefill(a, b, fastv.layer, fastv.ratio) for a, b in zip(nt, nv)],
                                 dtype=torch.float64)
        else:
            flops, _ = self.flops_per_sample(batch["prompt_ids"], batch["prompt_mask"], chosen, routed=routed)
        self.flops_mean[k].update(flops)
        if self.sample_records is not None:
            tasks = batch.get("task") or [""] * bs
            if "images" not in memo:  # every target of a batch reads the same pixels
                memo["images"] = image_fingerprints(batch["pixel_values"])
            images = memo["images"]
            new = [
                {"set": s, "target": t, "id": batch["id"][i], "subset": batch["subset"][i], "task": tasks[i],
                 "image": images[i], "question": batch["question"][i], "prediction": p,
                 "answer": a, "correct": normalize_answer(p) == normalize_answer(a),
                 "config": t if fastv else self.schedule.names[int(c)], "gflops": float(f) / 1e9,
                 "dense_gflops": float(d) / 1e9}
                for i, (p, a, c, f, d) in enumerate(zip(preds, batch["answer"], chosen.tolist(), flops, dense))
            ]
            if p_correct is not None:
                for r, pc in zip(new, p_correct.tolist()):
                    r["predicted_correct"] = round(pc, 4)
            self.sample_records += new
        if routed:
            self.choice[k].update(chosen)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)  # `visor eval --sets test` validates on data.test: label it so
        self._finish_eval("test" if getattr(dm, "eval_split", "val") == "test" else "val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, prefix: str) -> None:
        results: dict[str, dict[str, dict[str, float]]] = {}
        for s in self.val_set_names():
            dense = float(self.dense_mean[s].compute())
            # every value below is already summed over ranks by its torchmetric; sync_dist only keeps Lightning
            # from warning (the ranks hold the same number)
            log = lambda name, v: self.log(name, v, sync_dist=True)  # noqa: E731
            if self.score_loss:
                log(f"{prefix}/{s}/loss", self.val_loss[s].compute())
            log(f"{prefix}/{s}/gflops/dense", dense / 1e9)
            results[s] = {}
            for t in self.eval_targets():
                k = _metric_slot(s, t)
                acc, flops = float(self.em[k].compute()), float(self.flops_mean[k].compute())
                results[s][t] = {"acc": acc, "gflops": flops / 1e9, "saving": dense / flops if flops else float("nan")}
                log(f"{prefix}/{s}/acc/{metric_key(t)}", acc)
                log(f"{prefix}/{s}/gflops/{metric_key(t)}", flops / 1e9)
                log(f"{prefix}/{s}/flops_saving/{metric_key(t)}", results[s][t]["saving"])
            for t in filter(is_routed, self.eval_targets()):
                counts = self.choice[_metric_slot(s, t)].compute()
                share = counts / counts.sum().clamp_min(1)
                results[s][t]["choice"] = {n: float(x) for n, x in zip(self.schedule.names, share)}
                for n, x in zip(self.schedule.names, share):
                    log(f"{prefix}/{s}/{metric_key(t)}_share/{metric_key(n)}", x)
            self.eval_tokens[s] = {kind: float(self.tokens_mean[f"{s}|{kind}"].compute()) for kind in ("text", "visual")}
            self.dense_mean[s].reset()
            for kind in ("text", "visual"):
                self.tokens_mean[f"{s}|{kind}"].reset()
            self.val_loss[s].reset()
            for t in filter(is_routed, self.eval_targets()):
                self.choice[_metric_slot(s, t)].reset()
        for m in list(self.em.values()) + list(self.flops_mean.values()):
            m.reset()
        self.eval_results = results


def _metric_slot(val_set: str, target: str) -> str:
    """ModuleDict key of a (val set, target) metric: no dots, which torch refuses in module names."""
    return f"{val_set}|{metric_key(target)}".replace(".", "p")


def _as_backbone(value: BackboneSpec | dict | None) -> BackboneSpec | None:
    if value is None or isinstance(value, BackboneSpec):
        return value
    return BackboneSpec.from_dict(value)


def _as_schedule(value: ScheduleConfig | dict | None) -> ScheduleConfig | None:
    if value is None or isinstance(value, ScheduleConfig):
        return value
    return ScheduleConfig(**dict(value))


def _saved_spec(path: str | Path) -> BackboneSpec:
    from .weights import read_config

    return BackboneSpec.from_dict(read_config(Path(path))["backbone"])


__all__ = ["PARTS", "POLICY", "VisorLitModule", "is_routed", "normalize_answer", "part_of"]
