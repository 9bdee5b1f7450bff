"""Where builder samples come from: LLaVA-style JSON + an image folder, LLaVA-OneVision-Data parquet files,
the offline easy-vqa package, or the synthetic generator. Each source yields small picklable *items*; :func:`materialize` (run in builder workers)
turns one into a validated record and image bytes, or raises :class:`BadSample`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import image_bytes, open_image, sniff_ext
from .schema import BadSample, DataError, parse_record
from .synthetic import SyntheticConfig, make_sample

SOURCES = ("llava-json", "easy-vqa", "synthetic", "hf-parquet")
PARQUET_COLUMNS = ("id", "image", "conversations")  # LLaVA-OneVision-Data; data_source is optional


@dataclass
class Item:
    """One input record: ``kind`` says how to materialize ``payload``; ``where`` names it in errors."""

    kind: str
    payload: Any
    where: str


@dataclass
class Materialized:
    record: dict
    image: bytes
    ext: str
    conversion: str | None


def llava_json_items(json_path: str | Path, images: str | Path) -> tuple[int | None, Iterator[Item]]:
    """Records of a LLaVA-OneVision style ``.json`` list, or a ``.jsonl`` file (one record per line).

    A ``.json`` file that does not parse cannot be read leniently (no record boundaries): it raises a
    DataError with the line and column. In ``.jsonl`` each bad line is one ``malformed_json`` skip.
    """
    path, root = Path(json_path), Path(images)
    if not path.is_file():
        raise FileNotFoundError(f"--json {str(path)!r} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(root)!r} is not a directory")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
        return len(numbered), (Item("llava-line", (line, str(root)), f"{path}:{n}") for n, line in numbered)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix the file or convert it to .jsonl for lenient reading") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (LLaVA format), got {type(data).__name__}")
    return len(data), (Item("llava", (rec, str(root)), f"{path}[{i}]") for i, rec in enumerate(data))


def parquet_files(pattern: str) -> list[Path]:
    """The files a ``--parquet`` glob names (sorted, so a build is reproducible)."""
    import glob

    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"--parquet {pattern!r} matches no file")
    return files


def hf_parquet_items(pattern: str) -> tuple[int, Iterator[Item]]:
    """Rows of LLaVA-OneVision-Data parquet files (columns ``id``, ``image`` = {bytes, path}, ``conversations``
    = [{from, value}], ``data_source``), read one row group at a time: a multi-GB file never sits in memory.

    The total comes from the files' footers; a file without the columns raises a DataError naming it."""
    import pyarrow.parquet as pq

    files = parquet_files(pattern)
    total = 0
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
        missing = [c for c in PARQUET_COLUMNS if c not in meta.schema_arrow.names]
        if missing:
            raise DataError(f"{f}: no column(s) {missing}; LLaVA-OneVision-Data parquet has {list(PARQUET_COLUMNS)} "
                            f"(+ data_source), this file has {meta.schema_arrow.names}")
        total += meta.metadata.num_rows

    def gen() -> Iterator[Item]:
        for f in files:
            pf = pq.ParquetFile(f)
            columns = [c for c in (*PARQUET_COLUMNS, "data_source") if c in pf.schema_arrow.names]
            row = 0
            for g in range(pf.num_row_groups):
                for rec in pf.read_row_group(g, columns=columns).to_pylist():
                    image = rec.pop("image", None)
                    data = image.get("bytes") if isinstance(image, dict) else None
                    source = rec.pop("data_source", None)
                    rec["source"] = source or "llava-onevision-data"
                    yield Item("parquet", (rec, data), f"{f}[row {row}]")
                    row += 1

    return total, gen()


def easy_vqa_part(split: str, part: str | None = None) -> str:
    """Which easy-vqa split feeds ``split``: ``part`` if given, else "train" for split names containing "train"
    (train, easy_train, ...) and "test" otherwise, so validation never reads training images."""
    if part is None:
        part = "train" if "train" in split else "test"
    if part not in ("train", "test"):
        raise ValueError(f"easy-vqa has splits train and test, got {part!r}")
    return part


def easy_vqa_items(split: str, turns: int = 1, part: str | None = None) -> tuple[int, Iterator[Item]]:
    """easy-vqa questions (shape, colour, yes/no) from easy-vqa's ``easy_vqa_part(split, part)`` split.
    ``turns > 1`` groups up to that many questions about the same image into one multi-turn sample
    (more supervision per image forward, as in LLaVA's multi-turn data)."""
    import easy_vqa

    part = easy_vqa_part(split, part)
    if part == "train":
        qs, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()

    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    groups: list[list[int]] = []
    if turns == 1:
        groups = [[i] for i in range(len(qs))]
    else:
        by_image: dict[int, list[int]] = {}
        for i, img in enumerate(image_ids):
            by_image.setdefault(img, []).append(i)
        for img in sorted(by_image):
            idx = by_image[img]
            groups += [idx[k : k + turns] for k in range(0, len(idx), turns)]

    def gen() -> Iterator[Item]:
        for g in groups:
            conv = []
            for j, i in enumerate(g):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + qs[i]}, {"from": "gpt", "value": answers[i]}]
            rec = {"id": f"easyvqa-{part}-{g[0]:06d}", "conversations": conv, "source": "easy-vqa", "subset": "easy",
                   "image": paths[image_ids[g[0]]]}
            yield Item("file", rec, f"easy-vqa {part}[{g[0]}]")

    return len(groups), gen()


def synthetic_items(split: str, seed: int, count: int, cfg: SyntheticConfig) -> tuple[int, Iterator[Item]]:
    return count, (Item("synthetic", (cfg, seed, split, i), f"synthetic {split}[{i}]") for i in range(count))


def _from_bytes(conv_json: dict, data: bytes, max_pixels: int) -> Materialized:
    img, conversion = open_image(data, max_pixels)
    ext = sniff_ext(data)
    if conversion is not None or not ext:
        data, ext = image_bytes(img, "png"), "png"
    return Materialized(conv_json, data, ext, conversion)


def _from_parquet_row(rec: dict, data: bytes | None, max_pixels: int) -> Materialized:
    conv = parse_record(rec)
    if not data:
        raise BadSample("no_image", "row has no image bytes (text-only samples are not streamed)")
    return _from_bytes(conv.to_json(), data, max_pixels)


def _from_file(rec: Any, root: str | None, max_pixels: int) -> Materialized:
    if not isinstance(rec, dict):
        raise BadSample("malformed_json", f"expected a JSON object, got {type(rec).__name__}")
    conv = parse_record(rec)
    image = rec.get("image")
    if image is None:
        raise BadSample("no_image", "record has no 'image' (text-only samples are not streamed)")
    if isinstance(image, list):
        if len(image) != 1:
            raise BadSample("multi_image", f"{len(image)} images in one record")
        image = image[0]
    if not isinstance(image, str) or not image:
        raise BadSample("missing_image", f"'image' must be a file name, got {image!r:.60}")
    path = Path(image) if root is None else Path(root) / image
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadSample("missing_image", f"{path}: {e.strerror or e}") from None
    return _from_bytes(conv.to_json(), data, max_pixels)


def materialize(item: Item, max_pixels: int) -> Materialized:
    """Turn an item into a record + image bytes. Runs in builder worker processes."""
    if item.kind == "synthetic":
        cfg, seed, split, i = item.payload
        rec, img = make_sample(cfg, seed, split, i)
        return Materialized(parse_record(rec).to_json(), image_bytes(img, "png"), "png", None)
    if item.kind == "parquet":
        rec, data = item.payload
        return _from_parquet_row(rec, data, max_pixels)
    if item.kind == "file":
        return _from_file(item.payload, None, max_pixels)
    if item.kind == "llava":
        rec, root = item.payload
        return _from_file(rec, root, max_pixels)
    if item.kind == "llava-line":
        line, root = item.payload
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", str(e)) from None
        return _from_file(rec, root, max_pixels)
    raise ValueError(f"unknown item kind {item.kind!r}")
