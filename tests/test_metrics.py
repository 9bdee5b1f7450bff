"""Answer scoring: VQA normalisation, exact match and the policy's choice counts, summed over two real gloo ranks,
and the MLflow metric keys of configuration names."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from visor_lightning.lit.metrics import ChoiceCounts, ExactMatch, metric_key, normalize_answer


@pytest.mark.parametrize("text, want", [
    ("Red", "red"), ("red.", "red"), ("  RED!  ", "red"),
    ("The circle", "circle"), ("an apple", "apple"), ("A", ""),  # articles go
    ("two", "2"), ("Ten squares", "10 squares"), ("eleven", "eleven"),  # number words up to ten become digits
    ("then", "then"), ("another", "another"),  # an article inside a word stays
    ("light-blue", "light blue"), ("3,4", "3 4"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_after_normalisation():
    m = ExactMatch()
    m.update(["The Red.", "two", "blue"], ["red", "2", "green"])
    m.update(["a circle"], ["Circle!"])
    assert float(m.compute()) == pytest.approx(3 / 4)
    assert float(ExactMatch().compute()) == 0.0  # nothing seen: 0, not a division by zero


@pytest.mark.parametrize("name, key", [
    ("sa[0,3]", "sa_0_3"), ("sa[]", "sa"), ("sa[0]", "sa_0"), ("dense", "dense"), ("policy", "policy"),
    ("policy(max_acc_drop=0.05)", "policy_max_acc_drop_0.05"), ("fastv(k=1,r=0.944)", "fastv_k_1_r_0.944"),
])
def test_metric_key(name, key):
    assert metric_key(name) == key


def _rank(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        em, cc = ExactMatch(), ChoiceCounts(4)
        if rank == 0:
            em.update(["red", "blue"], ["red", "red"])  # 1 of 2
            cc.update(torch.tensor([0, 0, 2]))
        else:
            em.update(["2", "three", "circle"], ["two", "3", "circle"])  # 3 of 3
            cc.update(torch.tensor([[3], [0]]))
        out.put((rank, float(em.compute()), cc.compute().tolist()))
    finally:
        dist.destroy_process_group()


def test_exact_match_and_choice_counts_sum_over_two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, acc, counts in results:  # both ranks see the sums: 4 of 5 right, choices 3 x cfg0, 1 x cfg2, 1 x cfg3
        assert acc == pytest.approx(4 / 5)
        assert counts == [3.0, 0.0, 1.0, 1.0]
