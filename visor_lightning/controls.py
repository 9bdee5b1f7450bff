"""Controls that say whether accuracy comes from the image: the question-only baseline.

A model that answers from text priors matches this baseline, and its accuracy does not move when the images
are swapped between samples (the swapped-image copy of each evaluation set, ``data/streams.swap_images``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from visor_lightning.lit.metrics import normalize_answer


def read_qa(spec: str | list[str]) -> Iterator[tuple[str, str]]:
    """(question, answer) of every sample in the shards of ``spec`` (glob, manifest, list), images not decoded."""
    from visor_lightning.data.datamodule import resolve_shards
    from visor_lightning.data.schema import BadSample, SkipStats, parse_json_bytes, parse_record
    from visor_lightning.data.streams import raw_samples

    stats = SkipStats(strict=False)
    for url in resolve_shards(spec, field="baseline training split"):
        for raw in raw_samples(url, stats):
            try:
                conv = parse_record(parse_json_bytes(raw["json"]))
            except (BadSample, KeyError):
                continue  # the evaluation itself counts bad samples; the baseline only needs the good ones
            yield conv.question, conv.answer


def question_only_baseline(evaluated: Iterable[tuple[str, str]], reference: Iterable[tuple[str, str]] | None = None,
                           reference_name: str | None = None) -> dict[str, Any]:
    """Accuracy of answering each question with the majority answer its question string has in ``reference``
    (a training split), or in the evaluated set itself when no reference is given (an optimistic upper bound:
    it has seen the answers it is scored on). Questions the reference never saw get its overall majority answer.

    ``chance`` is the uniform-answer chance: per sample, 1 / the number of distinct answers its question string
    has in the reference (all answers for unseen strings), averaged.
    """
    evaluated = [(q, normalize_answer(a)) for q, a in evaluated]
    ref = evaluated if reference is None else [(q, normalize_answer(a)) for q, a in reference]
    if not evaluated:
        raise ValueError("question-only baseline: the evaluated set is empty")
    if not ref:
        raise ValueError(f"question-only baseline: the reference split {reference_name!r} has no samples")
    by_q: dict[str, Counter] = defaultdict(Counter)
    for q, a in ref:
        by_q[q][a] += 1
    overall = Counter(a for _, a in ref)
    top = overall.most_common(1)[0][0]
    hits = chance = 0.0
    unseen = 0
    for q, a in evaluated:
        counts = by_q.get(q)
        if counts is None:
            unseen += 1
        guess = counts.most_common(1)[0][0] if counts else top
        hits += guess == a
        chance += 1.0 / len(counts or overall)
    n = len(evaluated)
    return {"acc": hits / n, "chance": chance / n, "samples": n, "questions": len({q for q, _ in evaluated}),
            "unseen_questions": unseen, "counted_on": reference_name or "the evaluated set itself (optimistic)"}
