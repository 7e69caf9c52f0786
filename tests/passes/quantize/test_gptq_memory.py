"""GPTQ's solve in the Hessian's own memory: the same codes as with a copy, the Hessian used as scratch."""

from __future__ import annotations

import pytest
import torch

from graphopt.analysis.calibration import GramAccumulator
from graphopt.nn.quant import round_codes, weight_scales
from graphopt.passes.quantize.gptq import gptq_quantize, permute_rows_


def _hessian(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ torch.randn(k, k, generator=g)
    acc = GramAccumulator(k)
    acc.add(x)
    return acc.mean()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme, group", [("int4", 16), ("int8", 0)])
def test_overwriting_the_hessian_gives_the_same_codes(act_order, scheme, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    h = _hessian(64)
    kept = h.clone()
    codes, scales = gptq_quantize(w, h, scheme, group, act_order=act_order)
    assert torch.equal(h, kept)  # without overwrite the caller's Hessian is left alone
    scratch = h.clone()
    codes2, scales2 = gptq_quantize(w, scratch, scheme, group, act_order=act_order, overwrite=True)
    assert torch.equal(codes, codes2) and torch.equal(scales, scales2)
    assert not torch.equal(scratch, kept)  # it held the factor


@pytest.mark.parametrize("order", [[0], [1, 0], [2, 0, 1], [0, 1, 2, 3], [3, 2, 1, 0, 4], None])
def test_permute_rows_in_place_is_indexing(order):
    g = torch.Generator().manual_seed(2)
    order = order or torch.randperm(50, generator=g).tolist()
    h = torch.randn(len(order), len(order), generator=g, dtype=torch.float64)
    want = h[order][:, order]
    for view in (h, h.T):
        permute_rows_(view, order)
    assert torch.equal(h, want)


def test_spent_mean_is_the_mean_in_the_accumulators_memory():
    acc = GramAccumulator(8)
    acc.add(torch.randn(30, 8))
    want = acc.mean()
    got = acc.mean(spend=True)
    assert torch.equal(got, want) and got.data_ptr() == acc.gram.data_ptr()


def test_int4_scales_taken_in_chunks_of_rows_equal_the_whole():
    """weight_scales goes 16 MiB of rows at a time: 1100 rows x 4096 float64 inputs is three chunks."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1100, 4096, generator=g, dtype=torch.float64)
    importance = torch.rand(4096, generator=g, dtype=torch.float64)
    got = weight_scales(w, "int4", 128, importance=importance)
    want = torch.cat([weight_scales(w[i:i + 100], "int4", 128, importance=importance) for i in range(0, 1100, 100)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme, group", [("int4", 16), ("int8", 0)])
def test_act_order_codes_come_back_in_the_weights_column_order(scheme, group):
    """A diagonal Hessian spreads no error: GPTQ is rounding to nearest, visited in a shuffled column order (its
    diagonal's, descending). The codes, put back in place, are the nearest codes of each column."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g, dtype=torch.float64)
    h = torch.diag(torch.rand(64, generator=g, dtype=torch.float64) + 0.5)
    codes, scales = gptq_quantize(w, h.clone(), scheme, group, act_order=True, overwrite=True)
    assert torch.argsort(torch.diag(h), descending=True).tolist() != list(range(64))
    per_column = scales.double().repeat_interleave(group or 64, dim=1)[:, :64]
    assert torch.equal(codes.double(), round_codes(w, per_column, scheme))


def test_float_weights_are_freed_as_their_packed_layers_replace_them(monkeypatch):
    """By the time GPTQ solves a block's last layer, the float weights of the block's layers already packed are
    gone (the pass held every target's weight to its end: a 1B Llama's gate and up projections, 128 MiB, sat
    beside down_proj's 512 MiB Hessian)."""
    import gc
    import weakref

    import graphopt as go
    from graphopt.helpers.zoo import hf_model
    from graphopt.passes.quantize import algorithms

    model, inputs = hf_model("llama_causal_lm")
    block = model.model.layers[0]
    originals = {n: weakref.ref(m.weight) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(originals) == 7
    alive_at_last: list[list[str]] = []
    solve = algorithms.gptq_quantize

    def watched(weight, *args, **kwargs):
        if weight.shape[1] == block.mlp.down_proj.in_features and not alive_at_last:  # block 0's down_proj
            gc.collect()
            alive_at_last.append(sorted(n for n, ref in originals.items() if ref() is not None))
        return solve(weight, *args, **kwargs)

    monkeypatch.setattr(algorithms, "gptq_quantize", watched)
    go.optimize(model, inputs, pipeline="quantize(scheme=int4,method=gptq,group_size=16)", calib=[inputs] * 2,
                inplace=True, verify=False)
    assert alive_at_last == [["mlp.down_proj"]]
