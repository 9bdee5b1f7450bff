"""Scene tasks of the embedded demo: answers that need the image, at the resolution the demo's vision path sees.

Every question's answer is uniform over its answer set given the question string, so a question-only model
scores chance (the "question-only baseline"); only the image can do better.

- **easy** (coarse, one glance): ``shape``: one large shape on a plain background; the colour of the shape,
  or of the background.
- **hard** (fine-grained, relational): small squares, each one cell of a grid of 8-px cells (one SigLIP
  patch at the demo's 32-px canvas, 32-px crops and 8-px patches; a 4x4 grid):
  ``tally`` how many squares of a colour; ``locate`` the colour at a named row and column; ``beside`` the
  colour of the square next to a uniquely coloured one. ``beside`` and ``tally`` need several visual tokens
  combined; ``locate`` needs the position of a token.

Every scene also has a description for alignment data (``visor data build --describe``: one constant prompt, so
only the image can lower the loss).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

EASY_TASKS = ("shape",)
HARD_TASKS = ("tally", "locate", "beside")
SCENE_TASKS = EASY_TASKS + HARD_TASKS

PALETTE = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 240), "yellow": (240, 230, 30),
           "purple": (170, 40, 220), "cyan": (30, 220, 230)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (20, 20, 20)
CELL = 8  # pixels per grid cell on the hard canvas: one SigLIP patch at the demo's resolution
DIRECTIONS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}

QA = list[tuple[str, str]]
DESCRIBE = "Describe the image."  # the alignment stage's constant prompt: only the image can lower its loss


def family(task: str) -> str:
    return "easy" if task in EASY_TASKS else "hard"


def _shape(rng: random.Random, s: int) -> tuple[Image.Image, QA, str]:
    """One large shape on a plain background of another colour; it never touches the border."""
    colour, ground = rng.sample(sorted(PALETTE), 2)
    kind = rng.choice(SHAPES)
    img = Image.new("RGB", (s, s), PALETTE[ground])
    d = ImageDraw.Draw(img)
    margin = max(2, s // 8)
    size = rng.randint(int(0.45 * s), s - 2 * margin)
    x0, y0 = rng.randint(margin, s - margin - size), rng.randint(margin, s - margin - size)
    box = [x0, y0, x0 + size - 1, y0 + size - 1]
    if kind == "circle":
        d.ellipse(box, fill=PALETTE[colour])
    elif kind == "square":
        d.rectangle(box, fill=PALETTE[colour])
    else:
        d.polygon([(x0 + size / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=PALETTE[colour])
    return img, [("What color is the shape?", colour), ("What color is the background?", ground)], \
        f"{colour} {kind} on {ground}"


def _cells(s: int) -> int:
    if s % CELL or s < 4 * CELL:
        raise ValueError(f"hard scene canvas must be a multiple of {CELL} px and >= {4 * CELL}, got {s}")
    return s // CELL


def _caption(cells: dict[tuple[int, int], str]) -> str:
    """Every square with its position, in an order that varies by image ("row 2, column 3: red; row 1, column 1:
    blue"): the order cannot be learnt, so writing it needs what the questions need, reading a named position.
    A fixed reading order ("red - blue - / ...") is learnt as fixed offsets (exactly, in 1,200 demo steps) and did
    not carry over to the questions (docs/science.md)."""
    order = sorted(cells)
    random.Random(repr(sorted(cells.items()))).shuffle(order)  # from the scene itself: the image's rng is untouched
    return "; ".join(f"row {r + 1}, column {c + 1}: {cells[(r, c)]}" for r, c in order)


def _grid(cells: dict[tuple[int, int], str], s: int) -> Image.Image:
    img = Image.new("RGB", (s, s), BACKGROUND)
    d = ImageDraw.Draw(img)
    c = CELL
    m = 1  # a one-pixel margin: neighbours stay separable
    for (r, col), name in cells.items():
        d.rectangle([col * c + m, r * c + m, (col + 1) * c - m - 1, (r + 1) * c - m - 1], fill=PALETTE[name])
    return img


def _free(rng: random.Random, used: set[tuple[int, int]], k: int, n: int) -> list[tuple[int, int]]:
    free = [(r, c) for r in range(n) for c in range(n) if (r, c) not in used]
    return rng.sample(free, k)


def _tally(rng: random.Random, s: int) -> tuple[Image.Image, QA, str]:
    """Two colours (three on larger grids), 1..4 squares each; asks how many of one."""
    n = _cells(s)
    colours = rng.sample(sorted(PALETTE), 2 if n < 6 else 3)
    counts = {c: rng.randint(1, 4) for c in colours}
    cells: dict[tuple[int, int], str] = {}
    for c, k in counts.items():
        for pos in _free(rng, set(cells), k, n):
            cells[pos] = c
    return _grid(cells, s), [(f"How many {c} squares are there?", str(k)) for c, k in counts.items()], _caption(cells)


def _locate(rng: random.Random, s: int) -> tuple[Image.Image, QA, str]:
    n = _cells(s)
    k = rng.randint(n * n // 4, n * n // 2)
    cells = {pos: rng.choice(sorted(PALETTE)) for pos in _free(rng, set(), k, n)}
    qa = [(f"What color is the square in row {r + 1}, column {c + 1}?", name) for (r, c), name in cells.items()]
    return _grid(cells, s), qa, _caption(cells)


def _beside(rng: random.Random, s: int) -> tuple[Image.Image, QA, str]:
    """A uniquely coloured anchor with one neighbour per direction asked about; every other square has another
    colour than the anchor, so "the red square" names one square."""
    n = _cells(s)
    anchor = rng.choice(sorted(PALETTE))
    others = [c for c in sorted(PALETTE) if c != anchor]
    r, c = rng.randint(1, n - 2), rng.randint(1, n - 2)
    cells = {(r, c): anchor}
    qa = []
    for name, (dr, dc) in DIRECTIONS.items():
        col = rng.choice(others)
        cells[(r + dr, c + dc)] = col
        qa.append((f"What color is the square {name} the {anchor} square?", col))
    for pos in _free(rng, set(cells), rng.randint(n // 2, n), n):
        cells[pos] = rng.choice(others)
    return _grid(cells, s), qa, _caption(cells)


def make_scene(task: str, rng: random.Random, size: int) -> tuple[Image.Image, QA, str]:
    """(image, every question it answers, its description) for one scene task. The description names every
    visible property (the shape: colour, kind, background; a grid: every square's position and colour)."""
    return {"shape": _shape, "tally": _tally, "locate": _locate, "beside": _beside}[task](rng, size)
