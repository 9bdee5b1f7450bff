"""``visor data export-hf``: a built split as a Hugging Face ``datasets`` directory (``save_to_disk``), the form
lmms-eval tasks load offline (``dataset_kwargs: {load_from_disk: true}``; experiments/lmms_eval/).

One row per sample: ``id``, ``image``, ``question`` (the first human turn, without ``<image>``), ``answer`` (the
first gpt turn), ``task``, ``subset``. Needs ``datasets`` (installed by the ``eval`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .schema import IMAGE_PLACEHOLDER, SkipStats
from .shards import manifest_path, split_urls
from .streams import read_samples


def export_rows(directory: str, split: str) -> tuple[list[dict[str, Any]], SkipStats]:
    if not manifest_path(directory, split).is_file():
        raise FileNotFoundError(f"{manifest_path(directory, split)}: no such manifest (visor data build first)")
    stats = SkipStats()
    rows = []
    for ex in read_samples(split_urls(directory, split), stats):
        (_, question), (_, answer) = ex.conv.turns[0], ex.conv.turns[1]
        rows.append({"id": ex.conv.id, "image": ex.image, "question": question.replace(f"{IMAGE_PLACEHOLDER}\n", "", 1),
                     "answer": answer, "task": str(ex.conv.extra.get("task", "")), "subset": ex.conv.subset})
    return rows, stats


def export_hf(directory: str, split: str, out: str, hf_split: str = "test") -> dict[str, Any]:
    """Write ``out`` (a DatasetDict with one split, ``hf_split``); returns what was written."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError('visor data export-hf needs the datasets package: pip install -e ".[eval]"') from e
    rows, stats = export_rows(directory, split)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "task": datasets.Value("string"), "subset": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    # one arrow file per split, at a fixed name: the lmms-eval tasks read it as data_files (experiments/lmms_eval)
    datasets.DatasetDict({hf_split: ds}).save_to_disk(out, num_shards={hf_split: 1})
    return {"split": split, "rows": len(rows), "skipped": stats.skipped(), "out": str(Path(out)), "hf_split": hf_split}
