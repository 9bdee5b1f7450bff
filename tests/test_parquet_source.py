"""``visor data build --source hf-parquet``: LLaVA-OneVision-Data's parquet layout, read row group by row group,
with the same skip reasons, strict mode and manifest as every other builder."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visor_lightning.cli import main
from visor_lightning.data.schema import DataError, SkipStats
from visor_lightning.data.shards import read_manifest, split_urls
from visor_lightning.data.sources import hf_parquet_items
from visor_lightning.data.streams import read_samples

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("data_source", pa.string()),
])


def _png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _rows(start: int) -> list[dict]:
    rows = []
    for i in range(start, start + 6):
        rows.append({"id": f"ov-{i}", "image": {"bytes": _png((10 * i, 20, 30)), "path": f"{i}.png"},
                     "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                       {"from": "gpt", "value": f"colour {i}"}],
                     "data_source": "toy_caption"})
    return rows


@pytest.fixture()
def parquet_dir(tmp_path):
    """Two files, several row groups each; one corrupt image, one row without an image, one multi-turn row."""
    a = _rows(0)
    a[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": "bad.png"}
    a[2]["image"] = None
    a[3]["conversations"] = [{"from": "human", "value": "<image>\nHow many squares?"}, {"from": "gpt", "value": "2"},
                             {"from": "human", "value": "And circles?"}, {"from": "gpt", "value": "1"}]
    b = _rows(6)
    b[0]["data_source"] = None
    d = tmp_path / "ov" / "sub"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(a, schema=SCHEMA), d / "train-00000.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(b, schema=SCHEMA), d / "train-00001.parquet", row_group_size=4)
    return tmp_path / "ov"


def test_parquet_build_reads_every_row_once_and_counts_the_bad_ones(parquet_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "build", "--source", "hf-parquet", "--parquet", str(parquet_dir / "**/*.parquet"),
                 "--out", str(out), "--split", "ov", "--shard-size", "4", "--no-progress"]) == 0
    manifest = read_manifest(out, "ov")
    assert manifest["input"] == 12 and manifest["written"] == 10
    assert manifest["skipped"] == {"corrupt_image": 1, "no_image": 1}
    assert manifest["sources"] == {"toy_caption": 9, "llava-onevision-data": 1}
    assert manifest["builder"]["parquet"].endswith("**/*.parquet")
    got = {ex.conv.id: ex for ex in read_samples(split_urls(out, "ov"), SkipStats())}
    assert sorted(got) == sorted(f"ov-{i}" for i in range(12) if i not in (1, 2))
    multi = got["ov-3"].conv
    assert [t for _, t in multi.turns] == ["<image>\nHow many squares?", "2", "And circles?", "1"]
    assert got["ov-0"].conv.source == "toy_caption" and got["ov-6"].conv.source == "llava-onevision-data"
    assert got["ov-7"].image.getpixel((0, 0)) == (70, 20, 30)  # the row's own pixels, not a neighbour's
    text = capsys.readouterr().out
    assert "corrupt_image" in text and "train-00000.parquet[row 1]" in text


def test_parquet_strict_mode_names_the_file_and_row(parquet_dir, tmp_path, capsys):
    assert main(["data", "build", "--source", "hf-parquet", "--parquet", str(parquet_dir / "**/*.parquet"),
                 "--out", str(tmp_path / "s"), "--split", "ov", "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train-00000.parquet[row 1]: corrupt_image" in err and "(strict; drop --strict" in err


def test_parquet_reads_one_row_group_at_a_time(parquet_dir, monkeypatch):
    """Never a whole file: every read goes through ParquetFile.read_row_group."""
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read a whole file"))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: calls.append(i) or real(self, i, **k))
    total, items = hf_parquet_items(str(parquet_dir / "**/*.parquet"))
    assert total == 12 and len(list(items)) == 12
    assert calls == [0, 1, 2, 0, 1]  # 3 groups of 2 rows, then 2 groups of 4


def test_parquet_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        hf_parquet_items(str(tmp_path / "*.parquet"))
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: no column\(s\) \['image', 'conversations'\]"):
        hf_parquet_items(str(tmp_path / "*.parquet"))
    (tmp_path / "y.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="y.parquet: not a readable parquet file"):
        hf_parquet_items(str(tmp_path / "y.parquet"))
