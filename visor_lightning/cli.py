"""The ``visor`` command. Sub-commands import their heavy dependencies lazily, so ``visor --help`` is fast."""

from __future__ import annotations

import argparse
import json
import sys


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 2x2, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid sides must be >= 1, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visor",
        description="VISOR-Lightning: VISion On Request vision-language models (CVPR 2026) on PyTorch Lightning.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser(
        "flops",
        help="analytic prefill/decode FLOPs and visual-KV bytes of every feasible configuration vs dense",
        description="The formula is documented in visor_lightning/flops.py and docs/flops.md.",
    )
    f.add_argument("--config", required=True, help="experiment YAML with a model: section (backbone, schedule)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    f.add_argument("--text-tokens", type=_positive, default=64, help="prompt text tokens (default 64)")
    f.add_argument("--visual-tokens", type=_positive, default=None, help="override the visual token count")
    f.add_argument("--grid", type=_grid, default=(2, 2), help="AnyRes tile grid of a square image (default 2x2)")
    f.add_argument("--decode-tokens", type=_positive, default=16, help="generated tokens to average decode over")
    f.add_argument("--kv-bytes", type=_positive, default=2, help="bytes per KV element (2 = bf16)")

    d = sub.add_parser(
        "demo",
        help="tiny end-to-end run on CPU: build + load a LLaVA-OV checkpoint, VISOR forward/generate, FLOPs",
    )
    d.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--images", type=_positive, default=8, help="easy-vqa images in the batch (default 8)")
    d.add_argument("--repeats", type=_positive, default=7, help="timed repeats per configuration (median kept)")
    d.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return parser


def cmd_flops(args: argparse.Namespace) -> int:
    from .config import load_model_section
    from .flops import FlopsModel, Workload, format_table, workload_dict

    section = load_model_section(args.config)
    work = Workload(
        text_tokens=args.text_tokens, visual_tokens=args.visual_tokens, grid=args.grid,
        decode_tokens=args.decode_tokens, bytes_per_element=args.kv_bytes,
    )
    rows = FlopsModel(section.backbone, section.schedule, section.policy_width).table(work)
    if args.json:
        print(json.dumps({"config": args.config, "schedule": section.schedule.describe(),
                          "workload": workload_dict(work, section.backbone), "rows": rows}, indent=2))
    else:
        nv = work.resolve_visual(section.backbone)
        print(f"schedule {section.schedule.describe()}  (S always-on SA, s optional SA, C cross-attention, . text-only)")
        print(f"workload: {work.text_tokens} text + {nv} visual tokens, {work.decode_tokens} decode steps\n")
        print(format_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, seed=args.seed, images=args.images, repeats=args.repeats, json_path=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    handlers = {"flops": cmd_flops, "demo": cmd_demo}
    if args.command not in handlers:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"visor {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
