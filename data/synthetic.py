"""The "hard" family: fine-grained, vision-sensitive questions rendered offline with PIL.

Three tasks, each answerable only by looking closely (small marks on a large canvas):
``read`` a small number written in a named cell of a document-like page, ``count`` small objects of one kind
among distractors, and read a bar's value off a ``chart``. Sample ``i`` of a split depends only on
(seed, split, i), so output is identical for any number of builder workers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .images import image_fingerprint
from .scenes import DESCRIBE, SCENE_TASKS, family, make_scene
from .schema import IMAGE_PLACEHOLDER

DOCUMENT_TASKS = ("read", "count", "chart")  # hard, text-rich pages (large canvases)
TASKS = DOCUMENT_TASKS + SCENE_TASKS  # scene tasks (data/scenes.py): the embedded demo's easy and hard families
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "orange": (240, 140, 20)}


@dataclass
class SyntheticConfig:
    image_size: int = 512  # large enough that visual tokens dominate the sequence at LLaVA-OV resolutions
    tasks: tuple[str, ...] = TASKS
    max_count: int = 9
    num_bars: int = 5
    turns: int = 1  # questions per image (a multi-turn sample)
    describe: bool = False  # scene tasks: one turn, "Describe the image." -> the scene's description (alignment data)
    exclude: frozenset[str] = frozenset()  # image fingerprints (e.g. a training split's) this split must not reuse

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"synthetic tasks must be a non-empty subset of {TASKS}, got {list(self.tasks)}")
        if self.image_size < 32:
            raise ValueError(f"synthetic image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.max_count <= 20 or not 2 <= self.num_bars <= 8 or self.turns < 1:
            raise ValueError("synthetic max_count must be in 1..20, num_bars in 2..8, turns >= 1")
        if self.describe and set(self.tasks) - set(SCENE_TASKS):
            raise ValueError(f"synthetic describe: only scene tasks {SCENE_TASKS} have descriptions, got {list(self.tasks)}")


def _rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _font(px: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, px))


QA = list[tuple[str, str]]  # every question the image answers, with its answer


def _read(rng: random.Random, s: int) -> tuple[Image.Image, QA]:
    img = Image.new("RGB", (s, s), (250, 250, 245))
    d = ImageDraw.Draw(img)
    cell = s // 3
    font = _font(s // 22)
    for k in range(1, 3):  # faint page grid
        d.line([(k * cell, 0), (k * cell, s)], fill=(215, 215, 215), width=max(1, s // 256))
        d.line([(0, k * cell), (s, k * cell)], fill=(215, 215, 215), width=max(1, s // 256))
    numbers = rng.sample(range(10, 100), 9)
    for i, n in enumerate(numbers):
        r, c = divmod(i, 3)
        x = c * cell + rng.randint(cell // 8, cell // 2)
        y = r * cell + rng.randint(cell // 8, cell // 2)
        d.text((x, y), str(n), fill=(20, 20, 20), font=font)
    qa = [(f"What number is written in the {POSITIONS[t]} cell?", str(numbers[t])) for t in range(9)]
    return img, qa


def _count(rng: random.Random, s: int, max_count: int) -> tuple[Image.Image, QA]:
    img = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(img)
    colour, distractor = rng.sample(sorted(COLOURS), 2)
    k = rng.randint(1, max_count)
    n_distract = rng.randint(1, max_count)
    radius = max(2, s // 32)
    placed: list[tuple[int, int]] = []
    items = [("circle", colour)] * k + [(rng.choice(["circle", "square"]), distractor) for _ in range(n_distract)]
    items += [("square", colour)] * rng.randint(0, 3)  # same colour, other shape
    for shape, col in items:
        for _ in range(200):  # rejection sampling: no overlaps, so the count is well defined
            x, y = rng.randint(radius, s - radius - 1), rng.randint(radius, s - radius - 1)
            if all((x - a) ** 2 + (y - b) ** 2 > (3 * radius) ** 2 for a, b in placed):
                break
        else:
            raise RuntimeError(f"synthetic count: no room for {len(items)} objects on {s}px; lower max_count")
        placed.append((x, y))
        box = [x - radius, y - radius, x + radius, y + radius]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[col])
    circles = {c: sum(1 for shape, col in items if shape == "circle" and col == c) for c in (colour, distractor)}
    return img, [(f"How many {c} circles are there?", str(n)) for c, n in circles.items()]


def _chart(rng: random.Random, s: int, num_bars: int) -> tuple[Image.Image, QA]:
    img = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(s // 20)
    left, bottom, top, right = s // 8, s - s // 8, s // 10, s - s // 16
    unit = (bottom - top) / 10
    for v in range(11):  # y ticks 0..10 with faint grid lines
        y = bottom - v * unit
        d.line([(left, y), (right, y)], fill=(225, 225, 225), width=1)
        d.text((left - s // 14, y - s // 40), str(v), fill=(60, 60, 60), font=font)
    d.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=max(1, s // 200))
    values = [rng.randint(1, 10) for _ in range(num_bars)]
    slot = (right - left) / num_bars
    for i, v in enumerate(values):
        x0 = left + i * slot + slot * 0.2
        d.rectangle([x0, bottom - v * unit, x0 + slot * 0.6, bottom], fill=(70, 110, 200))
        d.text((x0 + slot * 0.22, bottom + s // 80), "ABCDEFGH"[i], fill=(0, 0, 0), font=font)
    return img, [(f"What is the value of bar {'ABCDEFGH'[t]}?", str(v)) for t, v in enumerate(values)]


def _image(task: str, rng: random.Random, cfg: SyntheticConfig) -> tuple[Image.Image, QA]:
    if task in SCENE_TASKS:
        img, qa, caption = make_scene(task, rng, cfg.image_size)
        if cfg.describe:
            qa = [(DESCRIBE, caption)]
    elif task == "read":
        img, qa = _read(rng, cfg.image_size)
    elif task == "count":
        img, qa = _count(rng, cfg.image_size, cfg.max_count)
    else:
        img, qa = _chart(rng, cfg.image_size, cfg.num_bars)
    return img, qa


def make_sample(cfg: SyntheticConfig, seed: int, split: str, index: int) -> tuple[dict, Image.Image]:
    """Sample ``index`` of ``split``: (LLaVA record, RGB image). Pure function of its arguments.

    ``cfg.turns`` questions about the same image (distinct, in random order) make a multi-turn conversation."""
    rng = _rng(seed, split, index)
    task = cfg.tasks[index % len(cfg.tasks)]
    for _ in range(1000):  # redraw an image that the excluded split holds (same rng stream: still a pure function)
        img, qa = _image(task, rng, cfg)
        if not cfg.exclude or image_fingerprint(img) not in cfg.exclude:
            break
    else:
        raise RuntimeError(f"synthetic {split}[{index}]: 1000 draws all hit the excluded images; the task is too small")
    picked = rng.sample(qa, min(cfg.turns, len(qa)))
    suffix = "" if task in SCENE_TASKS else " Answer with a number."
    conv = []
    for j, (q, a) in enumerate(picked):
        conv += [{"from": "human", "value": (f"{IMAGE_PLACEHOLDER}\n" if j == 0 else "") + q + suffix},
                 {"from": "gpt", "value": a}]
    record = {
        "id": f"synthetic-{split}-{index:07d}",
        "conversations": conv,
        "source": "synthetic",
        "subset": family(task) if task in SCENE_TASKS else "hard",
        "task": task,
    }
    return record, img
