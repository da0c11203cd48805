"""Which examples a split is made of: one source, a mixture of sources, and an evaluation split
carved from the training examples. Pure functions of counts, weights and a seed; nothing here
reads or tokenizes data.

- A **mixture** (``data.train`` as a list of sources) without weights is the concatenation of its
  sources' examples (as torchtune's ``ConcatDataset``). With weights, the weights are the
  proportions of the mixture's examples (normalised by their sum, as the probabilities of
  ``datasets.interleave_datasets``): :func:`mixture_counts` says how many examples each source
  gives, :func:`pick` which ones (a seeded choice; an example repeats only when a source must give
  more than it has).
- A **carved** evaluation split (``data.eval: {from_train: 0.1}``) is a seeded choice of distinct
  training examples (:func:`carve`); the training split keeps every other example, so no
  example is both trained and evaluated on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Hashable


@dataclass(frozen=True)
class Part:
    """One source of a split, as read: the source, its split, subset, row limit and weight."""

    source: str
    split: str
    subset: str | None
    limit: int | None  # read only the first N rows
    weight: float | None  # None: not weighted


def source_parts(cfg: Any, which: str) -> tuple[list[Part], bool]:
    """The sources of ``data.train`` (``which="train"``) or of a listed/named ``data.eval``, and
    whether they form a mixture (a list). ``cfg`` is a :class:`prefkit.recipe.DataConfig`."""
    value, split, limit = (cfg.train, cfg.train_split, cfg.max_rows) if which == "train" else \
        (cfg.eval, cfg.eval_split, cfg.max_eval_rows)
    if isinstance(value, str):
        return [Part(value, split, cfg.subset, limit, None)], False
    return [Part(e.source, e.split or split, e.subset if e.subset is not None else cfg.subset, e.max_rows, e.weight)
            for e in value], True


def _fraction(weight: float) -> Fraction:
    return Fraction(repr(float(weight)))  # 0.7 is 7/10 exactly, so hand-computed counts match


def mixture_counts(available: list[int], weights: list[float] | None, *, total: int | None = None,
                   cap: int | None = None) -> list[int]:
    """How many examples each source gives.

    Without weights: every example of every source, then (``cap``) only the first ``cap`` of the
    concatenation. With weights: ``total`` examples (default: the most the weights allow without
    using any example twice, ``min(n_i / p_i)`` over the sources with a weight above 0), at most
    ``cap``, shared by the proportions ``p_i = w_i / sum(w)``: each source gets ``floor(p_i * total)``
    and the examples left over go to the largest remainders (the earlier source on a tie).
    """
    if weights is None:
        counts, left = [], cap if cap is not None else sum(available)
        for n in available:
            counts.append(min(n, left))
            left -= counts[-1]
        return counts
    if len(weights) != len(available):
        raise ValueError("one weight per source")
    fractions = [_fraction(w) for w in weights]
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    shares = [f / sum(fractions) for f in fractions]
    if total is None:
        total = min(math.floor(n / p) for n, p in zip(available, shares) if p > 0)
    if cap is not None:
        total = min(total, cap)
    exact = [p * total for p in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def pick(available: int, count: int, seed: int, index: int) -> list[int]:
    """Which of a source's ``available`` examples (indices, in source order) fill ``count``:
    all of them ``count // available`` times, then a seeded choice of ``count % available``."""
    if count <= 0 or available <= 0:
        return []
    full, rest = divmod(count, available)
    rng = random.Random(f"prefkit-mixture:{seed}:{index}")
    return list(range(available)) * full + sorted(rng.sample(range(available), rest))


def carve_count(amount: int | float, available: int) -> int:
    """Examples carved for evaluation: ``amount`` itself (an int), or ``ceil(amount * available)``
    (a fraction in (0, 1), as ``datasets``' ``train_test_split(test_size=...)`` rounds)."""
    if isinstance(amount, int):
        return amount
    return math.ceil(amount * available)


def carve(identities: list[Hashable], amount: int | float, seed: int) -> set[Hashable]:
    """A seeded choice of ``carve_count(amount, n)`` distinct identities among ``identities``
    (in a stable order), the evaluation examples. Raises ValueError when it would leave no
    training example."""
    distinct = list(dict.fromkeys(identities))
    count = carve_count(amount, len(distinct))
    if count >= len(distinct):
        raise ValueError(f"carving {amount} of {len(distinct)} example(s) takes {count}, leaving none for training")
    rng = random.Random(f"prefkit-carve:{seed}")
    return set(rng.sample(distinct, count))
