"""Argument helpers shared by ``cli.py`` and the commands (so that no command imports ``cli.py``)."""

from __future__ import annotations

import argparse


def grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 2x2, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid sides must be >= 1, got {text!r}")
    return h, w


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Token counts and VISOR-TR pooling, shared by `visor flops` and `visor bench prefill|decode`."""
    p.add_argument("--text-tokens", type=positive, default=64, help="prompt text tokens (default 64)")
    p.add_argument("--visual-tokens", type=positive, default=None, help="override the visual token count")
    p.add_argument("--grid", type=grid, default=(2, 2), help="AnyRes tile grid of a square image (default 2x2)")
    p.add_argument("--decode-tokens", type=positive, default=16, help="generated tokens to average decode over")
    p.add_argument("--kv-bytes", type=positive, default=2, help="bytes per KV element (2 = bf16)")
    p.add_argument("--token-pool", type=positive, default=None,
                   help="VISOR-TR: visual-token pooling factor (1, 2, 4, 9, 16; default: the config's backbone.token_pool)")


def add_data_build_args(b: argparse.ArgumentParser) -> None:
    """``visor data build``'s arguments; the pipeline parses its ``data.builds`` entries with the same ones."""
    b.add_argument("--source", required=True, choices=["llava-json", "hf-parquet", "easy-vqa", "synthetic"],
                   help="llava-json: LLaVA conversation records + image directory; hf-parquet: LLaVA-OneVision-Data "
                        "parquet files; easy-vqa: the easy-vqa package's images; synthetic: the demo's scenes")
    b.add_argument("--out", required=True, help="output directory (shards and manifest)")
    b.add_argument("--split", default="train", help="split name: shard files are {split}-000000.tar, ... (default train)")
    b.add_argument("--json", dest="json_file", help="llava-json: the records (.json list or .jsonl)")
    b.add_argument("--images", help="llava-json: directory the records' 'image' paths are relative to")
    b.add_argument("--parquet", help='hf-parquet: glob of LLaVA-OneVision-Data parquet files, e.g. "data/*/train-*.parquet"')
    b.add_argument("--max-samples", type=positive, default=None, help="stop after writing this many (synthetic: how many to make, default 1000)")
    b.add_argument("--shard-size", type=positive, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--workers", type=int, default=0, help="builder processes (default 0: in this process)")
    b.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    b.add_argument("--image-size", type=positive, default=512, help="synthetic: canvas side in pixels (default 512)")
    b.add_argument("--tasks", default="read,count,chart", help="synthetic: comma-separated tasks (default read,count,chart)")
    b.add_argument("--easy-vqa-split", choices=["train", "test"], default=None,
                   help="easy-vqa: which of its splits to read (default: train if the split name contains 'train')")
    b.add_argument("--exclude-images-of", default=None, metavar="SPLIT",
                   help="synthetic: never reuse an image of these splits (comma-separated, already built in --out), e.g. train for a test split")
    b.add_argument("--turns", type=positive, default=1, help="easy-vqa/synthetic: questions per image in one multi-turn sample")
    b.add_argument("--describe", action="store_true",
                   help='synthetic scene tasks: "Describe the image." -> the scene\'s description, one turn (alignment data)')
    b.add_argument("--max-pixels", type=positive, default=64_000_000, help="skip images with more pixels (default 64M)")
    b.add_argument("--strict", action="store_true", help="raise on the first bad sample instead of skipping it")
    b.add_argument("--overwrite", action="store_true", help="replace an existing split in --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``visor eval|submit ... -- --trainer.max_steps 9``: (own arguments, arguments for the stage config)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
