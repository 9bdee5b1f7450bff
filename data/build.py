"""``visor data build``: pick the source, build the split, say what happened."""

from __future__ import annotations

import argparse

from .report import log_counts_to_mlflow, manifest_counts, summary_line
from .shards import build_shards, manifest_path
from .sources import easy_vqa_items, easy_vqa_part, hf_parquet_items, llava_json_items, synthetic_items
from .synthetic import SyntheticConfig


def builder_args(args: argparse.Namespace) -> dict:
    """What decides a build's content (recorded in the manifest; the pipeline reuses a split when they match)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "data_command", "no_progress", "version")}


def image_fingerprints(out: str, splits: str) -> frozenset[str]:
    """The images of already built splits in ``out`` (comma-separated: an evaluation split built with
    ``--exclude-images-of train,align`` reuses none of them: held-out means held-out, even where a generator could
    repeat itself)."""
    from .schema import SkipStats
    from .shards import manifest_path, split_urls
    from .images import image_fingerprint
    from .streams import read_samples

    found: set[str] = set()
    for split in (s.strip() for s in splits.split(",") if s.strip()):
        if not manifest_path(out, split).is_file():
            raise FileNotFoundError(f"--exclude-images-of {split}: build that split in {out} first (no manifest)")
        found |= {image_fingerprint(ex.image) for ex in read_samples(split_urls(out, split), SkipStats())}
    print(f"synthetic: excluding the {len(found)} distinct images of {splits}")
    return frozenset(found)


def run_build(args: argparse.Namespace) -> int:
    recorded = builder_args(args)
    if args.source == "llava-json":
        if not args.json_file or not args.images:
            raise ValueError("--source llava-json needs --json FILE and --images DIR")
        total, items = llava_json_items(args.json_file, args.images)
    elif args.source == "hf-parquet":
        if not args.parquet:
            raise ValueError('--source hf-parquet needs --parquet "<glob>" (LLaVA-OneVision-Data parquet files)')
        total, items = hf_parquet_items(args.parquet)
    elif args.source == "easy-vqa":
        total, items = easy_vqa_items(args.split, turns=args.turns, part=args.easy_vqa_split)
        print(f"easy-vqa: reading its {easy_vqa_part(args.split, args.easy_vqa_split)} split for {args.split!r}")
    else:
        exclude = image_fingerprints(args.out, args.exclude_images_of) if args.exclude_images_of else frozenset()
        cfg = SyntheticConfig(image_size=args.image_size, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                              turns=args.turns, describe=args.describe, exclude=exclude)
        total, items = synthetic_items(args.split, args.seed, args.max_samples or 1000, cfg)
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    manifest = build_shards(
        items, args.out, args.split, total=total, shard_size=args.shard_size, workers=args.workers,
        max_samples=args.max_samples, strict=args.strict, max_pixels=args.max_pixels, overwrite=args.overwrite,
        progress=not args.no_progress, builder_args=recorded,
    )
    print(summary_line(manifest))
    for ex in manifest["skipped_examples"][:5]:
        print(f"  skipped {ex['where']}: {ex['reason']}: {ex['detail']}")
    print(f"manifest: {manifest_path(args.out, args.split)}")
    if log_counts_to_mlflow(f"data/{args.split}", manifest_counts(manifest)):
        print("counts logged to the active MLflow run")
    return 0


