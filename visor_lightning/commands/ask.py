"""``visor ask``: one image and one question through a trained VISOR model, as a researcher checks a checkpoint by
hand. It prints the answer, the configuration that ran (the router's choice, or the one named), the router's
predicted correctness per configuration, and the prefill FLOPs against the dense host model on the same input.

The request goes through the same code as lmms-eval's ``--model visor`` (``VisorLMM``): the checkpoint's chat
template with ``<image>`` before the question, its image processor, greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from visor_lightning.errors import report


def run_ask(weights: str, processor: str, image: str, question: str, *, target: str = "policy",
            max_acc_drop: float | None = None, max_new_tokens: int = 16) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    from visor_lightning.commands.lmms_eval_adapter import VisorLMM

    if not Path(image).is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    try:
        picture = Image.open(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {image}: not an image PIL can read ({e})") from None
    lmm = VisorLMM(weights, processor, target=target, max_new_tokens=max_new_tokens, max_acc_drop=max_acc_drop)
    encoded = lmm._encode(question, [picture], "x", where=image)
    texts, chosen, batch = lmm._generate([encoded], max_new_tokens)
    lmm._record([image], batch, chosen)
    rec = lmm.records[-1]
    names = lmm.model.schedule.names
    p = lmm.predicted_correctness(batch) if target == "policy" else None
    return {
        "answer": texts[0].strip(), "config": rec["config"], "sa_layers": len(lmm.model.schedule.feasible[int(chosen[0])]),
        "chosen_by": ("router" if lmm.model.policy.head == "correctness" else "policy") if target == "policy" else "forced",
        "max_acc_drop": lmm.model.policy.knob(max_acc_drop) if target == "policy" else None,
        "policy_trained": lmm.model.policy.trained,
        "predicted_correct": None if p is None else round(float(p[0, int(chosen[0])]), 4),
        "predicted_correct_by_config": None if p is None else {n: round(float(v), 4) for n, v in zip(names, p[0])},
        "gflops": rec["gflops"], "dense_gflops": rec["dense_gflops"], "saving": rec["dense_gflops"] / rec["gflops"],
    }


def format_answer(r: dict[str, Any]) -> str:
    if r["chosen_by"] == "router":
        how = f"chosen by the router at max_acc_drop={r['max_acc_drop']:g}"
    else:
        how = "chosen by the policy" if r["chosen_by"] == "policy" else "named with --config"
    if r["chosen_by"] != "forced" and not r.get("policy_trained", True):
        how += "; UNTRAINED: no policy stage has trained this model's router, its choice is its random init's"
    lines = [f"answer: {r['answer']}", f"configuration: {r['config']} ({r['sa_layers']} SA layer{'s' if r['sa_layers'] != 1 else ''}; {how})"]
    if r["predicted_correct_by_config"]:
        lines.append(f"predicted correctness: {r['predicted_correct']:.2f}; every configuration: " + ", ".join(
            f"{n} {v:.2f}" for n, v in r["predicted_correct_by_config"].items()))
    elif r["chosen_by"] == "policy":
        lines.append("predicted correctness: none (this policy is a classifier; a router trained with objective "
                     "correctness predicts it)")
    lines.append(f"prefill: {r['gflops']:.4f} GFLOPs against {r['dense_gflops']:.4f} dense ({r['saving']:.2f}x fewer)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visor ask", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a stage's weights/ directory (or a .ckpt / DeepSpeed checkpoint)")
    p.add_argument("--processor", required=True,
                   help="directory with the tokenizer and preprocessor_config.json (the LLaVA-OV checkpoint's own; "
                   "the demo's: runs/demo/base/hf)")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--question", required=True, help="the question, as a user would type it")
    p.add_argument("--config", default="policy", help="'policy' (the model decides; default) or a configuration name, "
                   "e.g. sa[0]")
    p.add_argument("--max-acc-drop", type=float, default=None, metavar="X",
                   help="the router's knob: the cheapest configuration whose predicted accuracy is at most X below the "
                   "maximal one's (0 = strictest, the default; 1 = always the cheapest)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer in tokens (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the lines")
    return p


def ask_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    from visor_lightning.commands.json_out import emit, stdout_for_json

    with stdout_for_json(a.json) as out:
        try:
            res = run_ask(a.weights, a.processor, a.image, a.question, target=a.config, max_acc_drop=a.max_acc_drop,
                          max_new_tokens=a.max_new_tokens)
        except (FileNotFoundError, ValueError) as e:
            return report("ask", e)
        if a.json:
            emit(res, out)
            return 0
    print(format_answer(res))
    return 0
