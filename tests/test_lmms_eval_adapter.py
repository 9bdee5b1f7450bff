"""The lmms-eval adapter, offline: lmms-eval's request layout (``Instance.args`` tuples and a task_dict) drives a
trained tiny checkpoint; answers equal what the training/eval data path generates for the same samples, greedy
continuations score as greedy, and lmms-eval itself is only needed to register."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image

from visor_lightning.data.datamodule import VisorDataModule
from visor_lightning.lit.weights import load_weights
from visor_lightning.commands.lmms_eval_adapter import VisorLMM, register


@dataclass
class Instance:  # lmms-eval's Instance as the model sees it: request type and the args tuple
    request_type: str
    args: tuple


def _docs(data) -> dict[str, dict[str, Any]]:
    """easy_dev straight from its tar shards: id -> {image, question, answer}."""
    docs: dict[str, dict[str, Any]] = {}
    for tar in sorted(data.glob("easy_dev-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = t.extractfile(m).read()
        for parts in members.values():
            rec = json.loads(parts["json"])
            q = rec["conversations"][0]["value"].removeprefix("<image>\n")
            docs[rec["id"]] = {"image": Image.open(io.BytesIO(parts["png"])), "question": q,
                               "answer": rec["conversations"][1]["value"]}
    return docs


def _requests(docs, kind="generate_until", continuation=None):
    visual = lambda doc: [doc["image"]]  # noqa: E731
    if kind == "generate_until":
        return [Instance(kind, (d["question"], {"until": ["\n"], "max_new_tokens": 4}, visual, i, "easy", "val")) for i, d in docs.items()]
    return [Instance(kind, (d["question"], continuation[i], visual, i, "easy", "val")) for i, d in docs.items()]


def _data_path(weights, data, batch: int):
    """The checkpoint, the easy_dev loader the training/eval path uses, and its tokenizer."""
    model = load_weights(weights).eval()
    dm = VisorDataModule(val={"easy": str(data / "easy_dev-manifest.json")}, tokenizer=str(data / "tokenizer"),
                         batch_size=4, eval_batch_size=batch, num_workers=0)
    dm.backbone = model.backbone
    dm.setup("validate")
    return model, dm.val_dataloader()[0], dm.encoder.tok


@pytest.mark.parametrize("target,stage,knob", [("sa[0,3]", "policy", None), ("policy", "policy", None),
                                               ("policy", "router", 0.1)])
def test_answers_equal_the_data_path(tiny_pipeline, target, stage, knob):
    data, out = tiny_pipeline["data"], tiny_pipeline["out"]
    weights = out / stage / "weights"
    docs = dict(list(_docs(data).items())[:8])
    lmm = VisorLMM(weights=str(weights), processor=str(out / "base" / "hf"), target=target, batch_size=3, max_acc_drop=knob)
    got = dict(zip(docs, lmm.generate_until(_requests(docs), {"easy": {"val": docs}})))

    model, loader, tok = _data_path(weights, data, batch=5)
    seen = 0
    for batch in loader:
        use_policy = target == "policy"
        ids = None if use_policy else torch.full((len(batch["id"]),), model.schedule.index(target))
        tokens, _ = model.generate(batch["prompt_ids"], batch["pixel_values"], batch["image_sizes"], batch["prompt_mask"],
                                   max_new_tokens=4, config_ids=ids, use_policy=use_policy, eos_token_id=tok.eos_token_id,
                                   max_acc_drop=knob)
        for i, text in zip(batch["id"], tok.batch_decode(tokens, skip_special_tokens=True)):
            if i in got:
                assert got[i] == text.split("\n")[0].strip(), i
                seen += 1
    assert seen == len(docs) == 8
    summary = lmm.flops_summary()
    assert summary["requests"] == 8 and summary["saving"] > 1
    if target != "policy":
        assert summary["configs"] == {target: 8}
    if knob is not None:  # the knob through lmms-eval's model args: a classifier refuses it, as does a fixed target
        with pytest.raises(ValueError, match="objective: correctness"):
            VisorLMM(weights=str(out / "policy" / "weights"), processor=str(out / "base" / "hf"), max_acc_drop=knob)
        with pytest.raises(ValueError, match="needs target=policy"):
            VisorLMM(weights=str(weights), processor=str(out / "base" / "hf"), target="sa[0]", max_acc_drop=knob)


def test_loglikelihood_equals_the_teacher_forced_data_path(tiny_pipeline):
    """log P(answer | image, question) and the greedy flag, against a forward of the DataModule's own batch."""
    data, out = tiny_pipeline["data"], tiny_pipeline["out"]
    weights = out / "universal" / "weights"
    docs = _docs(data)
    lmm = VisorLMM(weights=str(weights), processor=str(out / "base" / "hf"), target="sa[0,3,5]")
    answers = {i: d["answer"] for i, d in docs.items()}
    scored = dict(zip(docs, lmm.loglikelihood(_requests(docs, "loglikelihood", answers), {"easy": {"val": docs}})))

    model, loader, tok = _data_path(weights, data, batch=4)
    for batch in loader:
        ids = torch.full((len(batch["id"]),), model.schedule.index("sa[0,3,5]"))
        with torch.no_grad():
            res = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"], config_ids=ids)
        targets = model.text_targets(batch["labels"], res.lm.streams.text_idx)
        for row, i in enumerate(batch["id"]):
            n = len(tok(batch["answer"][row], add_special_tokens=False)["input_ids"])
            pos = (targets[row] != -100).nonzero().flatten()[:n]
            logp = res.logits[row, pos].log_softmax(-1)
            ref = float(logp.gather(1, targets[row, pos, None]).sum())
            greedy = bool((logp.argmax(-1) == targets[row, pos]).all())
            assert scored[i][0] == pytest.approx(ref, abs=1e-4) and scored[i][0] < 0 and scored[i][1] == greedy, i
    assert len(scored) == 16


def test_bad_arguments_and_missing_lmms_eval(tiny_pipeline):
    out = tiny_pipeline["out"]
    with pytest.warns(UserWarning, match="no policy stage has trained the router"):  # universal weights' router
        VisorLMM(weights=str(out / "universal" / "weights"), processor=str(out / "base" / "hf"), target="policy")
    with pytest.raises(ValueError, match="not 'policy', a feasible configuration"):
        VisorLMM(weights=str(out / "policy" / "weights"), processor=str(out / "base" / "hf"), target="sa[9]")
    with pytest.raises(ValueError, match="FastV prunes a dense model"):
        VisorLMM(weights=str(out / "policy" / "weights"), processor=str(out / "base" / "hf"), target="fastv(k=1,r=0.5)")
    with pytest.raises(FileNotFoundError, match="weights=/nope"):
        VisorLMM(weights="/nope", processor=str(out / "base" / "hf"))
    dense = VisorLMM(weights=str(out / "base" / "weights"), processor=str(out / "base" / "hf"), target="sa[0,1,2,3,4,5]")
    assert dense.target == "dense"  # the schedule's alias resolves to the dense model's configuration name
    lmm = VisorLMM(weights=str(out / "base" / "weights"), processor=str(out / "base" / "hf"), target="fastv(k=1,r=0.500)")
    docs = dict(list(_docs(tiny_pipeline["data"]).items())[:2])
    bad = [Instance("generate_until", ("q", {}, lambda d: [d["image"], d["image"]], "a", "easy", "val"))]
    with pytest.raises(ValueError, match="easy/val/a: .* exactly one image"):
        lmm.generate_until(bad, {"easy": {"val": {"a": docs[next(iter(docs))]}}})
    assert len(lmm.generate_until(_requests(docs), {"easy": {"val": docs}})) == 2
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lmms-eval"):
            register()
    else:  # the extra is installed (make install): the model class lands in lmms-eval's registry under the name
        from lmms_eval.api.registry import get_model

        from visor_lightning.commands.lmms_eval_model import Visor

        assert register("visor-alias") is Visor and get_model("visor-alias") is Visor
