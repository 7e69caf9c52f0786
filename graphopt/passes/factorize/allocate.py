"""Ranks per layer for a share of the layers' weights removed: the same share everywhere, spent globally, or
the same share of every layer's directions (:func:`direction_ranks`).

A rank-``r`` pair stores ``r (in + out)`` weights against the dense ``in x out``, so a layer saves nothing
until its rank falls under the break-even ``in·out / (in + out)`` (half the rank of a square layer): the
saving is not a smooth function of the rank and a greedy descent from full rank stalls at that step.
``global`` therefore solves the multiple-choice knapsack "least total truncation loss, weights within the
budget" over each layer's candidate ranks (multiples of ``rank_multiple`` under the break-even, or the dense
layer kept) by a Lagrangian relaxation: for a price ``λ`` per weight each layer takes the rank minimising
``loss + λ·weights``, and ``λ`` is bisected to the cheapest price that meets the budget; what budget is left
then buys back rank where it lowers the loss most per weight. The loss is each layer's truncation loss as a
share of its own energy (:meth:`Spectrum.relative_loss`), the rule SVD-LLM V2 (Wang et al. 2025) follows in
giving layers whose spectra fall fast the larger cuts.
"""

from __future__ import annotations

from collections.abc import Callable

from graphopt.nn.lowrank import break_even_rank

from .decompose import Spectrum

Shape = tuple[int, int]  # (out, in)


class AllocationError(ValueError):
    """The ratio cannot be met with the layers and the rank multiple given."""


def stored(rank: int | None, shape: Shape) -> int:
    """Weights a layer stores at ``rank`` (``None``: the dense layer)."""
    out, inp = shape
    return out * inp if rank is None else rank * (out + inp)


def uniform_ranks(shapes: dict[str, Shape], ratio: float, multiple: int) -> dict[str, int | None]:
    """Each layer's rank that removes ``ratio`` of its own weights, rounded down to ``multiple`` (at least 1)."""
    ranks: dict[str, int | None] = {}
    for name, (out, inp) in shapes.items():
        exact = (1 - ratio) * out * inp / (out + inp)
        rank = int(exact // multiple) * multiple or int(exact)
        if rank < 1:
            raise AllocationError(f"factorize(ratio={ratio:g}) leaves {name} ({out}x{inp}) less than rank 1: "
                                  "lower the ratio")
        ranks[name] = rank
    return ranks


def direction_ranks(shapes: dict[str, Shape], ratio: float, multiple: int) -> dict[str, int | None]:
    """Every layer keeps the same share ``f`` of its directions (rank ``f·min(in, out)`` rounded down to
    ``multiple``, at least ``multiple``), the largest ``f`` that removes ``ratio`` of the weights; a layer
    whose rank at ``f`` saves nothing stays dense (``None``)."""
    def at(share: float) -> dict[str, int | None]:
        ranks: dict[str, int | None] = {}
        for name, (out, inp) in shapes.items():
            rank = max(int(share * min(out, inp) // multiple) * multiple, min(multiple, min(out, inp)))
            ranks[name] = rank if rank <= break_even_rank(inp, out) else None
        return ranks

    most = removed_share(at(0.0), shapes)
    if most < ratio:
        raise AllocationError(f"factorize(ratio={ratio:g}, allocation=directions) cannot remove that much with "
                              f"rank multiple {multiple}: every layer at rank {multiple} removes {most:.1%} "
                              "(lower the ratio or rank_multiple)")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed_share(at(mid), shapes) >= ratio else (lo, mid)
    return at(lo)


def _candidates(shape: Shape, multiple: int, spec: Spectrum) -> list[int | None]:
    top = min(break_even_rank(shape[1], shape[0]), len(spec.sigma))
    return [*range(multiple, top + 1, multiple), None]


def _loss(spec: Spectrum, rank: int | None) -> float:
    return 0.0 if rank is None else spec.relative_loss(rank)


def global_ranks(spectra: dict[str, Spectrum], shapes: dict[str, Shape], ratio: float,
                 multiple: int) -> dict[str, int | None]:
    """Ranks (``None``: left dense) with the least summed relative truncation loss that remove at least
    ``ratio`` of the layers' weights."""
    budget = (1 - ratio) * sum(out * inp for out, inp in shapes.values())
    options = {n: _candidates(shapes[n], multiple, spectra[n]) for n in shapes}
    smallest = sum(stored(opts[0], shapes[n]) for n, opts in options.items())
    if smallest > budget:
        raise AllocationError(f"factorize(ratio={ratio:g}, allocation=global) cannot remove that much with rank "
                              f"multiple {multiple}: every layer at its smallest rank keeps {smallest:,} of "
                              f"{sum(o * i for o, i in shapes.values()):,} weights (lower the ratio or rank_multiple)")

    def choose(price: float) -> dict[str, int | None]:
        return {n: min(opts, key=lambda r, n=n: _loss(spectra[n], r) + price * stored(r, shapes[n]))
                for n, opts in options.items()}

    def total(ranks: dict[str, int | None]) -> int:
        return sum(stored(r, shapes[n]) for n, r in ranks.items())

    lo, hi = -40.0, 10.0  # log10 of the price per weight: at 1e10 every layer takes its smallest rank
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(choose(10 ** mid)) <= budget else (mid, hi)
    ranks = choose(10 ** hi)
    return _spend_rest(ranks, options, lambda n, r: _loss(spectra[n], r), shapes,
                       budget - total(ranks))


def _spend_rest(ranks: dict[str, int | None], options: dict[str, list[int | None]],
                loss: Callable[[str, int | None], float], shapes: dict[str, Shape], left: float) -> dict[str, int | None]:
    """Raise ranks one candidate at a time, the largest loss saved per weight first, while the budget allows."""
    while True:
        best, best_gain = None, 0.0
        for name, rank in ranks.items():
            opts = options[name]
            i = opts.index(rank)
            if i + 1 == len(opts):
                continue
            nxt = opts[i + 1]
            cost = stored(nxt, shapes[name]) - stored(rank, shapes[name])
            if cost > left:
                continue
            gain = (loss(name, rank) - loss(name, nxt)) / max(cost, 1)
            if gain > best_gain:
                best, best_gain = (name, nxt, cost), gain
        if best is None:
            return ranks
        ranks[best[0]] = best[1]
        left -= best[2]


def removed_share(ranks: dict[str, int | None], shapes: dict[str, Shape]) -> float:
    """The share of the layers' weights the ranks remove."""
    before = sum(o * i for o, i in shapes.values())
    return 1 - sum(stored(r, shapes[n]) for n, r in ranks.items()) / before if before else 0.0

