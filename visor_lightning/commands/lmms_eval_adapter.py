"""lmms-eval adapter: run the paper's benchmarks (DocVQA, ChartQA, InfoVQA, OCRBench, TextVQA, POPE, GQA, ScienceQA,
MME, AI2D, RealWorldQA) on a VISOR checkpoint with lmms-eval, on a GPU cluster.

lmms-eval is an optional extra (``pip install -e ".[eval]"``); nothing here imports it. ``VisorLMM`` does the
work on lmms-eval's request layout (``Instance.args``); :mod:`visor_lightning.commands.lmms_eval_model` wraps it
as lmms-eval's model class, which the package's ``lmms_eval.models`` entry point registers as ``visor``::

    lmms-eval --model visor \\
        --model_args weights=runs/x/router/weights,processor=/models/llava-onevision-qwen2-0.5b-ov-hf,target=policy,max_acc_drop=0.05 \\
        --tasks docvqa_val,chartqa,pope --batch_size 8

Prompts go through the checkpoint's chat template with ``<image>`` in front of the task's context, as LLaVA-OV's
own lmms-eval model does. Every request's configuration and analytic prefill FLOPs are kept (``flops_summary``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from visor_lightning.models.fastv import FastVConfig

POLICY = "policy"
# per evaluated document (its "id" field, else task/split/doc_id): configuration and prefill FLOPs, read by a
# task's process_results (experiments/lmms_eval/utils.py) so that lmms-eval's output carries them per sample
SAMPLE_FLOPS: dict[str, dict[str, Any]] = {}


def sample_flops(doc_key: str) -> dict[str, Any]:
    """The configuration and prefill GFLOPs of one evaluated document; a KeyError names what is missing."""
    if doc_key not in SAMPLE_FLOPS:
        raise KeyError(f"no VISOR FLOPs recorded for document {doc_key!r}: was it answered by `--model visor`?")
    return SAMPLE_FLOPS[doc_key]


class VisorLMM:
    """A VISOR checkpoint answering lmms-eval requests.

    Args:
        weights: a stage's ``weights/`` directory, a ``.ckpt`` or a DeepSpeed checkpoint directory.
        processor: directory with the tokenizer and ``preprocessor_config.json`` (the LLaVA-OV checkpoint's own).
        target: ``policy`` (per-sample choice), a configuration name such as ``sa[0,12]``, or on a dense model
            ``fastv(k=K,r=R)``.
        batch_size: requests per forward (left-padded).
        max_new_tokens: default generation length when the task gives none.
        token_pool: VISOR-TR pooling factor, None keeps the checkpoint's.
        max_acc_drop: with ``target=policy`` and a router trained with objective correctness, the knob: the
            cheapest configuration whose predicted accuracy is at most this far below the maximal one's.
        device, dtype: default cuda + bfloat16 when present, else cpu + float32.
    """

    def __init__(self, weights: str, processor: str, target: str = POLICY, batch_size: int | str = 1,
                 max_new_tokens: int | str = 32, token_pool: int | str | None = None, device: str | None = None,
                 dtype: str | None = None, max_acc_drop: float | str | None = None) -> None:
        from visor_lightning.data.collate import Encoder, image_processor_for
        from visor_lightning.data.tokenizer import load_tokenizer
        from visor_lightning.flops import FlopsModel
        from visor_lightning.lit.weights import load_weights, weights_dir
        from visor_lightning.models import LayerSchedule

        if not Path(weights).exists():
            raise FileNotFoundError(f"weights={weights}: no such file or directory")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = load_weights(weights_dir(weights)).to(self.device, self.dtype).eval()
        if token_pool is not None:
            self.model.set_token_pool(int(token_pool))
        spec, sch = self.model.backbone, self.model.schedule
        self.fastv = FastVConfig.parse(target)
        if target != POLICY and self.fastv is None:
            try:  # the schedule owns the names and their aliases (a dense model's sa[0,...,L-1] is ``dense``)
                target = sch.canonical(target)
            except ValueError as e:
                raise ValueError(f"target={target!r}: not 'policy', a feasible configuration or fastv(k=K,r=R) ({e})") from None
        if self.fastv is not None and sch.ca_layers:
            raise ValueError(f"target={target!r}: FastV prunes a dense model; {weights} has CA layers")
        if target == POLICY and sch.router_layer is None:
            raise ValueError(f"target=policy: {weights} has no policy (a single configuration); name one of {sch.names}")
        if target == POLICY and not self.model.policy.trained:
            import warnings

            warnings.warn(f"target=policy: no policy stage has trained the router of {weights}: its choices are its "
                          "random init's (train one with a PolicyTraining stage, or name a configuration)", stacklevel=2)
        self.target = target
        self.max_acc_drop = None if max_acc_drop in (None, "") else float(max_acc_drop)
        if self.max_acc_drop is not None:
            if target != POLICY:
                raise ValueError(f"max_acc_drop={max_acc_drop} steers the router: it needs target=policy, got {target!r}")
            self.model.policy.knob(self.max_acc_drop)  # a classifier head, or a value outside [0, 1], fails here
        self.encoder = Encoder(load_tokenizer(processor), spec, image_processor_for(spec, processor))
        self.tok = self.encoder.tok
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.flops_model = FlopsModel(spec, sch)
        self.dense_flops_model = FlopsModel(spec, LayerSchedule.dense(sch.num_layers))
        self.records: list[dict[str, Any]] = []

    # ---- encoding ---------------------------------------------------------------------------------------
    def _encode(self, context: str, visuals: Sequence[Any], answer: str, where: str):
        from visor_lightning.data.schema import Conversation

        images = [v for v in visuals or [] if v is not None]
        if len(images) != 1:
            raise ValueError(f"{where}: VISOR's collator takes exactly one image per request, got {len(images)}")
        image = images[0].convert("RGB")
        conv = Conversation(id=where, turns=[("human", "<image>\n" + context), ("gpt", answer)], source="lmms-eval", subset="")
        return self.encoder(conv, image)

    def _generate(self, encoded: list, max_new_tokens: int) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
        from visor_lightning.data.collate import collate

        b = collate(encoded, self.encoder.pad_id)
        dev = self.device
        cids = None
        if self.target != POLICY and self.fastv is None:
            cids = torch.full((len(encoded),), self.model.schedule.index(self.target), device=dev)
        tokens, chosen = self.model.generate(
            b["prompt_ids"].to(dev), b["pixel_values"].to(dev, self.dtype), b["image_sizes"].to(dev),
            b["prompt_mask"].to(dev), max_new_tokens=max_new_tokens, config_ids=cids,
            use_policy=self.target == POLICY, eos_token_id=self.tok.eos_token_id, fastv=self.fastv,
            max_acc_drop=self.max_acc_drop,
        )
        return self.tok.batch_decode(tokens, skip_special_tokens=True), chosen, b

    @torch.no_grad()
    def predicted_correctness(self, b: dict[str, Any]) -> torch.Tensor | None:
        """A correctness router's P(correct) per configuration [B, K] on a collated batch's prompts, else None."""
        if self.model.policy.head != "correctness" or self.model.schedule.router_layer is None:
            return None
        dev = self.device
        logits = self.model.policy_logits(b["prompt_ids"].to(dev), b["pixel_values"].to(dev, self.dtype),
                                          b["image_sizes"].to(dev), b["prompt_mask"].to(dev))
        return self.model.policy.predicted_correctness(logits)

    def _record(self, keys: list[str], b: dict[str, Any], chosen: torch.Tensor) -> None:
        """Per request of a batch (``keys`` name them): the configuration run and its FLOPs."""
        from visor_lightning.flops import token_counts

        nt, nv = token_counts(b["prompt_ids"], b["prompt_mask"], self.model.backbone.image_token_id)
        feas, names = self.model.schedule.feasible, self.model.schedule.names
        for i, (t, v, c) in enumerate(zip(nt, nv, chosen.tolist())):
            if self.fastv is not None:
                f, name = self.dense_flops_model.fastv_prefill(t, v, self.fastv.layer, self.fastv.ratio), self.target
            else:
                f, name = self.flops_model.prefill(feas[c], t, v, routed=self.target == POLICY), names[c]
            rec = {"request": keys[i], "config": name, "gflops": f / 1e9,
                   "dense_gflops": self.dense_flops_model.prefill(None, t, v) / 1e9}
            self.records.append(rec)
            SAMPLE_FLOPS[keys[i]] = rec

    # ---- lmms-eval's request types ----------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any], task_dict: dict[str, Any]) -> list[str]:
        """``Instance.args`` = (context, gen_kwargs, doc_to_visual, doc_id, task, split): greedy answers, cut
        at the first of ``gen_kwargs['until']``."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            encoded, stops, lengths, keys = [], [], [], []
            for req in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                where = f"{task}/{split}/{doc_id}"
                doc = task_dict[task][split][doc_id]
                keys.append(str(doc["id"]) if isinstance(doc, dict) and "id" in doc else where)
                encoded.append(self._encode(context, doc_to_visual(doc), "x", where))
                until = (gen_kwargs or {}).get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                lengths.append(int((gen_kwargs or {}).get("max_new_tokens", self.max_new_tokens)))
            texts, chosen, b = self._generate(encoded, max(lengths))
            for i, text in enumerate(texts):
                for s in stops[i]:
                    text = text.split(s)[0] if s else text
                out.append(text.strip())
            self._record(keys, b, chosen)
        return out

    def loglikelihood(self, requests: Sequence[Any], task_dict: dict[str, Any]) -> list[tuple[float, bool]]:
        """``Instance.args`` = (context, doc_to_target, doc_to_visual, doc_id, task, split): log P(continuation |
        image, context) summed over the continuation's tokens, and whether greedy decoding would produce them."""
        from visor_lightning.data.collate import collate

        if self.fastv is not None:
            raise NotImplementedError("loglikelihood with FastV: score FastV through generate_until tasks")
        out: list[tuple[float, bool]] = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else str(doc_to_target)
            where = f"{task}/{split}/{doc_id}"
            e = self._encode(context, doc_to_visual(doc), continuation, where)
            n = len(self.tok(continuation, add_special_tokens=False)["input_ids"])
            b = collate([e], self.encoder.pad_id)
            dev = self.device
            with torch.no_grad():
                cids = None
                if self.target == POLICY:  # the configuration the policy picks for this prompt
                    cids = self.model(b["prompt_ids"].to(dev), b["pixel_values"].to(dev, self.dtype), b["image_sizes"].to(dev),
                                      b["prompt_mask"].to(dev), use_policy=True, last_only=True,
                                      max_acc_drop=self.max_acc_drop).lm.config_ids
                else:
                    cids = torch.tensor([self.model.schedule.index(self.target)], device=dev)
                res = self.model(b["input_ids"].to(dev), b["pixel_values"].to(dev, self.dtype), b["image_sizes"].to(dev),
                                 b["attention_mask"].to(dev), config_ids=cids)
            targets = self.model.text_targets(b["labels"].to(dev), res.lm.streams.text_idx)[0]
            pos = (targets != -100).nonzero().flatten()[:n]  # the continuation's tokens (the end-of-turn ones follow)
            logp = res.logits[0, pos].float().log_softmax(-1)
            tgt = targets[pos]
            out.append((float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())))
        return out

    def flops_summary(self) -> dict[str, Any]:
        """Mean analytic prefill GFLOPs per request, dense's, the saving, and how often each configuration ran."""
        if not self.records:
            return {"requests": 0}
        g = sum(r["gflops"] for r in self.records) / len(self.records)
        d = sum(r["dense_gflops"] for r in self.records) / len(self.records)
        share: dict[str, int] = {}
        for r in self.records:
            share[r["config"]] = share.get(r["config"], 0) + 1
        return {"requests": len(self.records), "gflops": g, "dense_gflops": d, "saving": d / g, "configs": share}


def register(name: str = "visor") -> type:
    """Register the model under another name from Python (``--model visor`` needs nothing: the package's
    ``lmms_eval.models`` entry point registers it when lmms-eval starts)."""
    try:
        from lmms_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError('the lmms-eval adapter needs lmms-eval: pip install -e ".[eval]" (an optional extra)') from e
    from visor_lightning.commands.lmms_eval_model import Visor

    return register_model(name)(Visor)


__all__ = ["POLICY", "SAMPLE_FLOPS", "VisorLMM", "register", "sample_flops"]
