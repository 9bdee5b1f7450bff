"""A 30-second stand-in for the demo base on one question: can a tiny causal LLM learn `locate`?

The demo's base (5 minutes per probe on 2 cores) does not learn to read the grid cell a question names
(docs/science.md). This script isolates that skill so a hypothesis costs seconds and several seeds: a 4x4 grid
of cells (4-8 coloured, the rest empty), the question "row R, column C" as two tokens, and one answer (6 colours).
The LLM is shaped like the demo's (d=64, 6 layers, 4 heads, RoPE theta 1e4, causal, pre-norm), but built from
LayerNorm + GELU blocks with PyTorch's init: a stand-in, not a replica. The visual tokens come from one of three
sources:

- ``embed``: a learned vector per colour (what a perfect vision path would hand over);
- ``rgb``: a linear map of the cell's RGB colour, then LLaVA's two-layer projector;
- ``pixels``: the 32-px image rendered as the demo draws it (8-px cells, 1-px margins), an 8-px patch
  convolution with a position embedding, ``--vision-layers`` ViT blocks, then the projector (SigLIP-shaped; the
  patch convolution initialised as transformers' SigLIP does, or with ``--patch-init torch``).

Two switches bring it closer to the demo: ``--llm qwen2`` swaps the stand-in blocks for transformers' Qwen2 in
the demo base's shape and init (``initializer_range`` 0.072; the text and ``embed`` vectors drawn at the same std,
as the demo's text embeddings and projector are), and ``--layout llava-ov`` hands the visual tokens over as the
demo's AnyRes packing does at 32 px: the base view's 16, then the same 16 again as the tile with a newline token
closing each row (36 tokens). ``--question demo --fillers 7 --after 8`` asks as the demo's tokenizer and chat template
do ("row", a digit, "column", a digit, with the template's tokens around the question), ``--rope-theta`` sets the
Qwen2 LLM's RoPE base, and ``--vision-tower siglip`` puts transformers' SigLIP (the demo's shape and init) behind the
pixels.

Not product code: nothing here is imported by visor_lightning. Usage:
    python experiments/diagnostics/locate_toy.py --cells pixels --vision-layers 2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from visor_lightning.data.scenes import BACKGROUND, CELL, PALETTE as SCENE_PALETTE
from visor_lightning.lit.module import warmup_cosine

D, HEADS, GRID, COLOURS = 64, 4, 4, len(SCENE_PALETTE)
SIDE = GRID * CELL  # the demo's 32-px canvas
EMPTY = 0  # cell value 0 is empty; 1..6 are the scenes' colours in their order
PALETTE = torch.tensor([BACKGROUND, *SCENE_PALETTE.values()]).float() / 127.5 - 1  # SigLIP-normalised
FILLER, WHAT, ASK = 0, 1, 2  # text vocabulary: 3 markers, then 4 row words, then 4 column words
ROW0, COL0, VOCAB = 3, 7, 11
# --question demo: "row", a digit, "column", a digit, as the demo's tokenizer splits "row 2, column 3" (the digits
# shared by both parts of the address); the words reuse ids of the vocabulary above
ROW_WORD, DIGIT0, COLUMN_WORD = ROW0, ROW0 + 1, COL0 + 3


def make_batch(n: int, rng: random.Random, fillers: int, question: str = "cells",
               after: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cells [n, 16], question tokens [n, fillers + 4 (6 for ``question="demo"``) + after], answer colour [n])."""
    cells, questions, answers = [], [], []
    for _ in range(n):
        grid = [EMPTY] * GRID * GRID
        for p in rng.sample(range(GRID * GRID), rng.randint(4, 8)):
            grid[p] = 1 + rng.randrange(COLOURS)
        p = rng.choice([i for i, c in enumerate(grid) if c != EMPTY])
        cells.append(grid)
        if question == "demo":
            q = [WHAT, ROW_WORD, DIGIT0 + p // GRID, COLUMN_WORD, DIGIT0 + p % GRID, ASK]
        else:
            q = [WHAT, ROW0 + p // GRID, COL0 + p % GRID, ASK]
        questions.append([FILLER] * fillers + q + [FILLER] * after)
        answers.append(grid[p] - 1)
    return torch.tensor(cells), torch.tensor(questions), torch.tensor(answers)


def most_frequent_colour_accuracy(cells: torch.Tensor, answers: torch.Tensor) -> float:
    """The position-free strategy every demo model stops at: answer with the image's most frequent colour."""
    counts = F.one_hot(cells, COLOURS + 1)[:, :, 1:].sum(1).float()  # [n, colours]
    best = counts == counts.max(1, keepdim=True).values  # ties: the answer counts by the share of tied colours
    return (best[torch.arange(len(answers)), answers] / best.sum(1)).mean().item()


def render(cells: torch.Tensor) -> torch.Tensor:
    """[n, 16] cell values -> [n, 3, 32, 32] normalised pixels, drawn as data/scenes.py draws a grid: a square with a
    one-pixel margin in each 8-px cell, on the dark ground."""
    n = cells.shape[0]
    ground = PALETTE[EMPTY].view(1, 3, 1, 1).expand(n, 3, SIDE, SIDE)
    colour = PALETTE[cells].view(n, GRID, GRID, 3).permute(0, 3, 1, 2)
    colour = colour.repeat_interleave(CELL, 2).repeat_interleave(CELL, 3)
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    for r in range(GRID):
        for c in range(GRID):
            inside[r * CELL + 1:(r + 1) * CELL - 1, c * CELL + 1:(c + 1) * CELL - 1] = True
    return torch.where(inside, colour, ground)


def rope(x: torch.Tensor, theta: float = 1e4) -> torch.Tensor:
    half = torch.arange(0, x.shape[-1], 2) / x.shape[-1]
    angle = torch.arange(x.shape[-2]).float()[:, None] / theta ** half[None]
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


class Block(nn.Module):
    """Pre-norm transformer block; causal with RoPE (the LLM) or bidirectional without (the ViT)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.causal:
            q, k = rope(q), rope(k)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(h.transpose(1, 2).reshape(n, t, D))
        return x + self.mlp(self.norm2(x))


QWEN2_STD = 0.072  # the demo base's backbone.text.initializer_range
DEMO_VOCAB = 384  # the demo tokenizer's vocabulary, padded to a multiple of 64 (--head vocab)


class Toy(nn.Module):
    def __init__(self, cells: str, vision_layers: int, patch_init: str = "siglip", llm: str = "standin",
                 layout: str = "grid", rope_theta: float = 1e4, tower: str = "standin", head: str = "colours",
                 oracle: bool = False) -> None:
        super().__init__()
        self.cells, self.layout = cells, layout
        self.embed = nn.Embedding(COLOURS + 1, D) if cells == "embed" else None
        self.rgb = nn.Linear(3, D) if cells == "rgb" else None
        if cells == "pixels":
            self.patch = nn.Conv2d(3, D, CELL, CELL)  # one patch per cell, as the demo's SigLIP sees the grid
            if patch_init == "siglip":  # transformers' SigLIP: LeCun normal weights, zero bias
                nn.init.trunc_normal_(self.patch.weight, std=(1 / (3 * CELL * CELL)) ** 0.5)
                nn.init.zeros_(self.patch.bias)
            self.position = nn.Parameter(torch.randn(GRID * GRID, D) / D ** 0.5)  # SigLIP's init
            self.vision = nn.ModuleList(Block(causal=False) for _ in range(vision_layers))
        self.siglip = None
        self.projector = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        if cells == "pixels" and tower == "siglip":  # transformers' SigLIP in the demo's shape and init
            from transformers import SiglipVisionConfig, SiglipVisionModel

            from visor_lightning.models.vision import VisionEncoder

            siglip = SiglipVisionModel(SiglipVisionConfig(
                hidden_size=D, num_hidden_layers=max(vision_layers, 1), num_attention_heads=2, intermediate_size=128,
                image_size=SIDE, patch_size=CELL))
            self.siglip = VisionEncoder(siglip, feature_layer=vision_layers)  # the demo's: up to LLaVA's feature layer
            self._demo_projector_init()
        self.text = nn.Embedding(VOCAB, D)
        self.llm = nn.ModuleList(Block(causal=True) for _ in range(6))
        self.qwen2 = None
        if llm == "qwen2":
            from transformers import Qwen2Config, Qwen2Model

            self.qwen2 = Qwen2Model(Qwen2Config(
                hidden_size=D, num_hidden_layers=6, num_attention_heads=HEADS, num_key_value_heads=2,
                intermediate_size=256, rope_theta=rope_theta, vocab_size=VOCAB, max_position_embeddings=256,
                initializer_range=QWEN2_STD))
            self.llm = nn.ModuleList()
            for e in (self.text, self.embed):
                if e is not None:
                    nn.init.normal_(e.weight, std=QWEN2_STD)
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, COLOURS))
        if head == "vocab":  # the demo's LM head: the answer is one of 384 tokens, read after Qwen2's final norm
            self.head = nn.Linear(D, DEMO_VOCAB, bias=False)
            nn.init.normal_(self.head.weight, std=QWEN2_STD)
        self.oracle = oracle
        if oracle and cells != "embed":
            raise ValueError(f"--oracle shapes --cells embed (vision_oracle.py's tokens), not --cells {cells}")
        if oracle:  # vision_oracle.py's tokens: a unit-scale vector per colour, then the demo's projector
            nn.init.normal_(self.embed.weight, std=1.0)
            self._demo_projector_init()
        if layout == "llava-ov":  # LLaVA-OV's image_newline; drawn last, so the other inits match the grid layout's
            self.newline = nn.Parameter(torch.randn(D) / D ** 0.5)

    def _demo_projector_init(self) -> None:
        """LLaVA-OV's projector as the demo draws it: weights at the LLM's std, zero biases."""
        for lin in (self.projector[0], self.projector[2]):
            nn.init.normal_(lin.weight, std=QWEN2_STD)
            nn.init.zeros_(lin.bias)

    def visual_tokens(self, cells: torch.Tensor) -> torch.Tensor:
        if self.cells == "embed":
            return self.projector(self.embed(cells)) if self.oracle else self.embed(cells)
        if self.cells == "rgb":
            return self.projector(self.rgb(PALETTE[cells]))
        if self.siglip is not None:
            return self.projector(self.siglip(render(cells)))
        x = self.patch(render(cells)).flatten(2).transpose(1, 2) + self.position
        for block in self.vision:
            x = block(x)
        return self.projector(x)

    def packed(self, v: torch.Tensor) -> torch.Tensor:
        """[n, 16, D] cell tokens -> the sequence the LLM reads (``llava-ov``: base view + tile rows + newlines)."""
        if self.layout == "grid":
            return v
        n = v.shape[0]
        rows = torch.cat([v.view(n, GRID, GRID, D), self.newline.view(1, 1, 1, D).expand(n, GRID, 1, D)], 2)
        return torch.cat([v, rows.reshape(n, GRID * (GRID + 1), D)], 1)

    def forward(self, cells: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.packed(self.visual_tokens(cells)), self.text(question)], 1)
        if self.qwen2 is not None:
            x = self.qwen2(inputs_embeds=x).last_hidden_state
        for block in self.llm:
            x = block(x)
        return self.head(x[:, -1])


def run(cells: str, vision_layers: int = 0, fillers: int = 0, steps: int = 600, seed: int = 0, lr: float = 3e-3,
        eval_every: int = 150, quiet: bool = False, patch_init: str = "siglip", llm: str = "standin",
        layout: str = "grid", question: str = "cells", after: int = 0, rope_theta: float = 1e4,
        tower: str = "standin", head: str = "colours", oracle: bool = False, schedule: str = "constant") -> float:
    """Train one toy from scratch (batch 16, AdamW betas 0.9/0.95 as the demo); return held-out accuracy."""
    torch.manual_seed(seed)
    model = Toy(cells, vision_layers, patch_init, llm, layout, rope_theta, tower, head, oracle)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if schedule == "constant" else
                                              warmup_cosine(step, 30, steps, 0.1))  # the demo base's: 30 warm-up, 0.1
    rng, dev = random.Random(seed), make_batch(1000, random.Random(10_000 + seed), fillers, question, after)
    start, acc = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        cells_b, asked, answer = make_batch(16, rng, fillers, question, after)
        loss = F.cross_entropy(model(cells_b, asked), answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                acc = (model(dev[0], dev[1])[:, :COLOURS].argmax(-1) == dev[2]).float().mean().item()
            if not quiet:
                print(f"  step {step}: held-out accuracy {100 * acc:.1f}% ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", choices=("embed", "rgb", "pixels"), default="pixels", help="where visual tokens come from")
    p.add_argument("--vision-layers", type=int, default=2, help="ViT blocks after the patch convolution (pixels)")
    p.add_argument("--patch-init", choices=("torch", "siglip"), default="siglip",
                   help="patch convolution init: transformers' SigLIP (LeCun normal, zero bias; the demo's) or PyTorch's")
    p.add_argument("--llm", choices=("standin", "qwen2"), default="standin",
                   help="LayerNorm + GELU stand-in blocks, or transformers' Qwen2 as the demo base's LLM")
    p.add_argument("--layout", choices=("grid", "llava-ov"), default="grid",
                   help="16 cell tokens, or the demo's 36 (base view + tile rows with newline tokens)")
    p.add_argument("--fillers", type=int, default=0, help="text tokens between the image and the question")
    p.add_argument("--after", type=int, default=0, help="text tokens between the question and the answer (the demo: 8)")
    p.add_argument("--question", choices=("cells", "demo"), default="cells",
                   help="one token per row and per column, or the demo's 'row', digit, 'column', digit")
    p.add_argument("--rope-theta", type=float, default=1e4, help="the Qwen2 LLM's RoPE base (--llm qwen2)")
    p.add_argument("--vision-tower", choices=("standin", "siglip"), default="standin",
                   help="pixels: stand-in ViT blocks, or transformers' SigLIP in the demo's shape and init")
    p.add_argument("--head", choices=("colours", "vocab"), default="colours",
                   help="a 6-way colour head, or the demo's LM head over 384 tokens (the colours are 6 of them)")
    p.add_argument("--oracle", action="store_true",
                   help="--cells embed as vision_oracle.py makes them: unit-scale vectors, then the demo's projector")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="constant learning rate, or the demo's 30 warm-up steps and cosine decay to 0.1")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    accs = []
    for seed in a.seeds:
        print(f"seed {seed}: cells={a.cells} vision_layers={a.vision_layers} patch_init={a.patch_init} "
              f"llm={a.llm} layout={a.layout} fillers={a.fillers} after={a.after} question={a.question} "
              f"rope_theta={a.rope_theta} vision_tower={a.vision_tower} lr={a.lr} head={a.head} oracle={a.oracle} "
              f"schedule={a.schedule}")
        accs.append(run(a.cells, a.vision_layers, a.fillers, a.steps, seed, a.lr, patch_init=a.patch_init,
                        llm=a.llm, layout=a.layout, question=a.question, after=a.after, rope_theta=a.rope_theta,
                        tower=a.vision_tower, head=a.head, oracle=a.oracle, schedule=a.schedule))
    cells, _, answers = make_batch(20_000, random.Random(1), a.fillers, a.question, a.after)
    print(f"held-out accuracy at step {a.steps}: " + " / ".join(f"{100 * x:.1f}" for x in accs)
          + f"% (seeds {a.seeds}); chance {100 / COLOURS:.1f}%, the image's most frequent colour "
          f"{100 * most_frequent_colour_accuracy(cells, answers):.1f}%")


if __name__ == "__main__":
    main()
