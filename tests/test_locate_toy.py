"""The `locate` stand-in (experiments/diagnostics/locate_toy.py): it draws what the demo draws, its position-free
reference is computed, and its reference LLM does learn to address a cell, so a source of visual tokens that stays
at the position-free level is the finding, not a broken harness (docs/science.md)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "experiments/diagnostics/locate_toy.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("locate_toy", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_draws_each_cell_in_its_8px_square_as_the_demo_does(toy):
    from visor_lightning.data.scenes import _grid

    cells = torch.zeros(1, 16, dtype=torch.long)
    cells[0, 1 * 4 + 2] = 3  # row 2, column 3: the third scene colour
    cells[0, 3 * 4 + 0] = 6  # row 4, column 1: the sixth
    names = list(toy.SCENE_PALETTE)
    demo = _grid({(1, 2): names[2], (3, 0): names[5]}, 32)  # data/scenes.py's drawing of the same grid
    expected = torch.tensor(list(demo.getdata())).float().view(32, 32, 3).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(toy.render(cells)[0], expected)


def test_questions_name_a_coloured_cell_and_the_answer_is_its_colour(toy):
    cells, questions, answers = toy.make_batch(200, random.Random(0), fillers=3)
    assert questions.shape == (200, 3 + 4) and (questions[:, :3] == toy.FILLER).all()
    row, col = questions[:, 4] - toy.ROW0, questions[:, 5] - toy.COL0
    named = cells[torch.arange(200), row * 4 + col]
    assert (named != toy.EMPTY).all() and (named - 1 == answers).all()


def test_most_frequent_colour_shares_ties(toy):
    cells = torch.tensor([[1, 1, 2] + [0] * 13, [1, 2] + [0] * 14])
    # image 1: colour 1 is the most frequent (the answer 0 = colour 1 scores); image 2: a tie, half a point
    assert toy.most_frequent_colour_accuracy(cells, torch.tensor([0, 1])) == pytest.approx(0.75)


@pytest.mark.slow
def test_reference_llm_learns_to_address_a_cell(toy):
    cells, _, answers = toy.make_batch(20_000, random.Random(1), 0)
    position_free = toy.most_frequent_colour_accuracy(cells, answers)  # ~0.40
    acc = toy.run("embed", steps=600, seed=0, eval_every=600, quiet=True)
    assert acc > position_free + 0.1, (acc, position_free)


def test_llava_ov_layout_packs_the_base_view_then_tile_rows_closed_by_newlines(toy):
    """The demo's 36 visual tokens at 32 px (connector.py's AnyRes packing): 16, then 4 x (4 + newline)."""
    model = toy.Toy("embed", 0, llm="qwen2", layout="llava-ov")
    cells = torch.randint(0, toy.COLOURS + 1, (2, 16))
    v = model.visual_tokens(cells)
    packed = model.packed(v)
    assert packed.shape == (2, 36, toy.D)
    assert torch.equal(packed[:, :16], v)
    tile = packed[:, 16:].view(2, 4, 5, toy.D)
    assert torch.equal(tile[:, :, :4].reshape(2, 16, toy.D), v)
    assert (tile[:, :, 4] == model.newline).all()
    _, questions, _ = toy.make_batch(2, random.Random(0), 0)
    assert model(cells, questions).shape == (2, toy.COLOURS)
    assert model.qwen2.config.initializer_range == toy.QWEN2_STD and not list(model.llm)


def test_vision_oracle_reads_each_patch_colour_of_a_demo_grid():
    """experiments/diagnostics/vision_oracle.py: the ids it hands the projector are the cells data/scenes.py drew."""
    spec = importlib.util.spec_from_file_location("vision_oracle", PATH.parent / "vision_oracle.py")
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    from visor_lightning.data.scenes import _grid

    names = list(oracle.PALETTE)
    image = _grid({(1, 2): names[2], (3, 0): names[5], (0, 0): names[0]}, 32)
    pixels = torch.tensor(list(image.getdata())).float().view(1, 32, 32, 3).permute(0, 3, 1, 2) / 127.5 - 1
    expected = torch.zeros(16, dtype=torch.long)  # background everywhere else
    expected[1 * 4 + 2], expected[3 * 4 + 0], expected[0] = 1 + 2, 1 + 5, 1 + 0
    assert torch.equal(oracle.oracle_ids(pixels, 8)[0], expected)
    grey = torch.zeros(1, 3, 32, 32)  # a colour that is none of them
    assert (oracle.oracle_ids(grey, 8) == oracle.OTHER).all()


def test_demo_questions_share_the_digits_between_row_and_column(toy):
    cells, questions, answers = toy.make_batch(200, random.Random(0), fillers=7, question="demo", after=8)
    assert questions.shape == (200, 7 + 6 + 8)
    assert (questions[:, :7] == toy.FILLER).all() and (questions[:, -8:] == toy.FILLER).all()
    q = questions[:, 7:13]
    assert (q[:, 1] == toy.ROW_WORD).all() and (q[:, 3] == toy.COLUMN_WORD).all()
    row, col = q[:, 2] - toy.DIGIT0, q[:, 4] - toy.DIGIT0
    assert row.min() >= 0 and col.max() < 4
    named = cells[torch.arange(200), row * 4 + col]
    assert (named != toy.EMPTY).all() and (named - 1 == answers).all()


def test_siglip_tower_hands_the_projector_its_last_used_layer(toy):
    model = toy.Toy("pixels", 2, llm="qwen2", tower="siglip", rope_theta=100.0)
    assert model.qwen2.rotary_emb.inv_freq[1].item() == pytest.approx(100.0 ** -0.125)
    cells = torch.randint(0, toy.COLOURS + 1, (2, 16))
    tower = model.siglip.tower  # transformers' own forward: hidden_states[2] is the second layer's output
    x = tower(pixel_values=toy.render(cells), output_hidden_states=True).hidden_states[2]
    assert len(tower.encoder.layers) == 2
    assert torch.allclose(model.visual_tokens(cells), model.projector(x), atol=1e-6)


def test_demo_head_oracle_tokens_and_cosine_schedule_match_the_real_base(toy, monkeypatch):
    """--head vocab scores the colours among 384 tokens; --oracle puts unit-scale colour vectors through the
    projector (vision_oracle.py's tokens); --schedule cosine warms up for 30 steps and decays to 0.1."""
    model = toy.Toy("embed", 0, llm="qwen2", layout="llava-ov", head="vocab", oracle=True)
    cells = torch.randint(0, toy.COLOURS + 1, (2, 16))
    assert torch.allclose(model.visual_tokens(cells), model.projector(model.embed(cells)))
    assert 0.8 < model.embed.weight.std().item() < 1.2 and model.projector[2].weight.std().item() < 0.1
    _, questions, _ = toy.make_batch(2, random.Random(0), 0, question="demo")
    assert model(cells, questions).shape == (2, toy.DEMO_VOCAB)
    lrs = []
    real_step = torch.optim.AdamW.step

    def record(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    toy.run("embed", steps=60, llm="standin", eval_every=60, quiet=True, schedule="cosine", lr=1e-2)
    assert len(lrs) == 60 and lrs[0] == pytest.approx(1e-2 / 30) and lrs[29] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-3, rel=0.05) and all(a >= b for a, b in zip(lrs[29:], lrs[30:]))


def test_oracle_tokens_need_embed_cells(toy):
    with pytest.raises(ValueError, match="--oracle shapes --cells embed"):
        toy.Toy("rgb", 0, oracle=True)
