"""factorize's math: whitened truncation error, exact full rank, singular Grams, and the global allocation."""

import pytest
import torch

from graphopt.passes.factorize.allocate import (
    AllocationError,
    direction_ranks,
    global_ranks,
    removed_share,
    stored,
    uniform_ranks,
)
from graphopt.passes.factorize.decompose import output_error, spectrum


def _correlated_inputs(rows=2000, features=48, span=None, seed=0):
    """Inputs whose channels are mixed and unevenly scaled (as activations are); ``span`` < features: rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, span or features, generator=g, dtype=torch.float64)
    scale = torch.logspace(1, -2, span or features, dtype=torch.float64)
    mix = torch.randn(span or features, features, generator=g, dtype=torch.float64)
    return (latent * scale) @ mix


def _weight(out=40, inp=48, seed=1):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _approx(spec, rank):
    up, down = spec.factors(rank, torch.float64)
    return up @ down


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_truncation_error_is_the_sum_of_the_dropped_squared_singular_values(rank):
    x = _correlated_inputs()
    w = _weight()
    gram = x.T @ x
    spec = spectrum(w, "whiten", gram, x.shape[0])
    err = float(((w.double() - _approx(spec, rank)) @ x.T).pow(2).sum())
    assert err == pytest.approx(spec.dropped(rank), rel=1e-4)
    assert output_error(w, _approx(spec, rank), gram) == pytest.approx(spec.relative_loss(rank), rel=1e-4)
    plain = output_error(w, _approx(spectrum(w, "svd"), rank), gram)
    scaled = output_error(w, _approx(spectrum(w, "asvd", gram, x.shape[0]), rank), gram)
    assert spec.relative_loss(rank) < 0.5 * plain  # plain SVD ignores which inputs the layer sees
    assert spec.relative_loss(rank) < scaled  # a per-channel scale cannot undo the mixing


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_is_exact(method):
    x = _correlated_inputs(features=32)
    w = _weight(24, 32)
    spec = spectrum(w, method, x.T @ x, x.shape[0])
    up, down = spec.factors(24, torch.float32)
    assert (up @ down - w).abs().max() < 1e-5
    assert spec.relative_loss(24) == 0.0


def test_a_singular_gram_does_not_crash_and_is_exact_at_the_inputs_rank():
    x = _correlated_inputs(rows=500, features=32, span=5)  # 32 channels, 5 independent directions
    w = _weight(24, 32)
    gram = x.T @ x
    assert torch.linalg.matrix_rank(gram) == 5
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram)  # what SVD-LLM V1's whitening would need
    spec = spectrum(w, "whiten", gram, x.shape[0])
    approx = _approx(spec, 5)
    assert torch.isfinite(approx).all()
    assert output_error(w, approx, gram) < 1e-8  # rank 5 reproduces every output the data can reach
    assert output_error(w, _approx(spectrum(w, "svd"), 5), gram) > 0.05


def _spectra():
    """Four layers: two whose spectra fall fast (inputs in few directions), two flat."""
    layers = {}
    for i, span in enumerate([6, 8, None, None]):
        x = _correlated_inputs(rows=800, features=64, span=span, seed=i)
        layers[f"l{i}"] = spectrum(_weight(64, 64, seed=10 + i), "whiten", x.T @ x, x.shape[0])
    return layers, dict.fromkeys(layers, (64, 64))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_global_allocation_meets_the_ratio_with_less_loss_than_uniform(ratio):
    spectra, shapes = _spectra()
    ranks = global_ranks(spectra, shapes, ratio, multiple=4)
    uniform = uniform_ranks(shapes, ratio, multiple=4)
    removed = removed_share(ranks, shapes)
    assert ratio <= removed < ratio + 4 * 128 / (4 * 64 * 64) + 1e-9  # within one rank step of the target

    def loss(rs):
        return sum(0.0 if r is None else spectra[n].relative_loss(r) for n, r in rs.items())

    assert loss(ranks) < loss(uniform)
    assert max(ranks["l0"], ranks["l1"]) < min(r or 64 for r in (ranks["l2"], ranks["l3"]))  # fast spectra cut first


def test_global_allocation_matches_an_exhaustive_search_on_a_small_space():
    spectra, shapes = _spectra()
    ranks = global_ranks(spectra, shapes, 0.4, multiple=8)
    options = [[*range(8, 32 + 1, 8), None]] * 4
    budget = 0.6 * 4 * 64 * 64
    best = min((sum(0.0 if r is None else spectra[f"l{i}"].relative_loss(r) for i, r in enumerate(combo)), combo)
               for combo in __import__("itertools").product(*options)
               if sum(stored(r, (64, 64)) for r in combo) <= budget)
    got = sum(0.0 if r is None else spectra[n].relative_loss(r) for n, r in ranks.items())
    assert got == pytest.approx(best[0], rel=1e-9), (ranks, best)


BLOCK = {"q": (384, 384), "o": (384, 384), "up": (1536, 384), "down": (384, 1536)}  # a transformer block's shapes


def test_direction_allocation_cuts_the_wide_layers_first_and_takes_the_largest_share_that_meets_the_ratio():
    ranks = direction_ranks(BLOCK, 0.2, multiple=8)
    assert ranks["q"] is None and ranks["o"] is None  # a square layer saves nothing until half its rank goes
    assert ranks["up"] == ranks["down"] and ranks["up"] % 8 == 0
    assert removed_share(ranks, BLOCK) >= 0.2
    one_more = {**ranks, "up": ranks["up"] + 8, "down": ranks["down"] + 8}
    assert removed_share(one_more, BLOCK) < 0.2  # the largest share of directions kept that meets the ratio
    deep = direction_ranks(BLOCK, 0.5, multiple=8)
    assert len(set(deep.values())) == 1 and deep["q"] is not None  # every layer keeps the same share
    assert removed_share(deep, BLOCK) >= 0.5


def test_a_ratio_the_smallest_ranks_cannot_meet_is_refused():
    spectra, shapes = _spectra()
    with pytest.raises(AllocationError, match="lower the ratio or rank_multiple"):
        global_ranks(spectra, shapes, 0.9, multiple=16)  # rank 16 of a 64x64 layer keeps half its weights
    with pytest.raises(AllocationError, match="less than rank 1"):
        uniform_ranks({"tiny": (2, 2)}, 0.9, 1)
    with pytest.raises(AllocationError, match="every layer at rank 64 removes"):
        direction_ranks(BLOCK, 0.8, multiple=64)  # rank 64 everywhere removes 75%
