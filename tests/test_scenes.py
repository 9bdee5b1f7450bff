"""The demo's scene tasks: what the question asks is what the image shows, one square per 8-px cell (one SigLIP
patch at the demo's resolution), and evaluation splits can refuse every training image."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from visor_lightning.data.scenes import BACKGROUND, CELL, PALETTE
from visor_lightning.data.images import image_fingerprint
from visor_lightning.data.synthetic import SyntheticConfig, make_sample

NAMES = {v: k for k, v in PALETTE.items()}


def _cells(img) -> dict[tuple[int, int], str]:
    """The colour name at every cell centre (None where empty), read back from the pixels."""
    n = img.width // CELL
    out = {}
    for r in range(n):
        for c in range(n):
            px = img.getpixel((c * CELL + CELL // 2, r * CELL + CELL // 2))
            out[(r, c)] = None if px == BACKGROUND else NAMES[px]
    return out


def test_hard_answers_are_what_the_pixels_show():
    cfg = SyntheticConfig(image_size=32, tasks=("tally", "locate", "beside"), turns=8)
    for i in range(60):
        rec, img = make_sample(cfg, 0, "t", i)
        cells = _cells(img)
        turns = rec["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            q, a = q["value"].replace("<image>\n", ""), a["value"]
            if m := re.fullmatch(r"How many (\w+) squares are there\?", q):
                assert Counter(cells.values())[m[1]] == int(a)
            elif m := re.fullmatch(r"What color is the square in row (\d), column (\d)\?", q):
                assert cells[(int(m[1]) - 1, int(m[2]) - 1)] == a
            else:
                m = re.fullmatch(r"What color is the square (right of|left of|above|below) the (\w+) square\?", q)
                (anchor,) = [pos for pos, name in cells.items() if name == m[2]]  # the anchor colour is unique
                dr, dc = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}[m[1]]
                assert cells[(anchor[0] + dr, anchor[1] + dc)] == a


def test_easy_answers_are_what_the_pixels_show():
    cfg = SyntheticConfig(image_size=32, tasks=("shape",), turns=2)
    for i in range(40):
        rec, img = make_sample(cfg, 0, "t", i)
        answers = {t["value"].replace("<image>\n", ""): a["value"] for t, a in zip(rec["conversations"][::2], rec["conversations"][1::2])}
        assert NAMES[img.getpixel((0, 0))] == answers["What color is the background?"]  # the border is background
        colours = Counter(img.getdata())
        shape = PALETTE[answers["What color is the shape?"]]
        assert shape != PALETTE[answers["What color is the background?"]]
        assert colours[shape] >= (0.45 * 32) ** 2 / 2  # a large shape (a triangle covers half its box)
        assert rec["subset"] == "easy"


def test_an_evaluation_split_redraws_excluded_images():
    cfg = SyntheticConfig(image_size=32, tasks=("shape",))
    first = [make_sample(cfg, 0, "x", i)[1] for i in range(20)]
    excluded = frozenset(image_fingerprint(img) for img in first)
    again = [make_sample(SyntheticConfig(image_size=32, tasks=("shape",), exclude=excluded), 0, "x", i)[1] for i in range(20)]
    assert not {image_fingerprint(img) for img in again} & excluded


def test_descriptions_name_what_the_pixels_show():
    """Alignment data: one constant prompt, and a description that names every square with its position (grids)
    or the shape's colour, kind and background, of the same image the questions of that sample would ask about."""
    from visor_lightning.data.scenes import DESCRIBE

    tasks = ("shape", "tally", "locate", "beside")
    for i in range(24):
        rec, img = make_sample(SyntheticConfig(image_size=32, tasks=tasks, describe=True), 0, "t", i)
        _, same = make_sample(SyntheticConfig(image_size=32, tasks=tasks, turns=2), 0, "t", i)
        assert image_fingerprint(img) == image_fingerprint(same)
        (q, a) = rec["conversations"]
        assert q["value"] == f"<image>\n{DESCRIBE}"
        words = a["value"].split()
        if rec["task"] == "shape":
            colour, kind, on, ground = words
            assert on == "on" and NAMES[img.getpixel((0, 0))] == ground and kind in ("circle", "square", "triangle")
            assert Counter(img.getdata())[PALETTE[colour]] > 0
        else:
            said = {}
            for item in a["value"].split("; "):
                m = re.fullmatch(r"row (\d), column (\d): (\w+)", item)
                said[(int(m[1]) - 1, int(m[2]) - 1)] = m[3]
            assert said == {pos: name for pos, name in _cells(img).items() if name}


def test_descriptions_are_for_scenes_only():
    with pytest.raises(ValueError, match="describe"):
        SyntheticConfig(image_size=64, tasks=("read",), describe=True)
