"""Quantize's algorithms behind one interface (passes/quantize/algorithms.py): each decides for a group of
layers that read one tensor from the statistic it names, and the roundings agree where the math says so."""

import pytest
import torch

from graphopt.analysis.calibration import GramAccumulator
from graphopt.nn.quant import W8A8_QMAX, quantize_weight
from graphopt.passes.quantize.algorithms import Gptq, LayerGroup, RoundToNearest, SmoothQuant, rounding
from graphopt.passes.quantize.plan import LayerPlan
from graphopt.passes.quantize.smoothquant import SmoothStats


def _group(plans, stats=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(6, 40, generator=g) for _ in plans]
    return LayerGroup([f"l{i}" for i in range(len(plans))], weights, list(plans), stats or [None] * len(plans))


def _identity_gram(features):
    acc = GramAccumulator(features)
    acc.add(torch.eye(features) * features ** 0.5)  # X^T X / rows = I
    return acc


@pytest.mark.parametrize("plan", [LayerPlan("int8", 0), LayerPlan("int4", 16), LayerPlan("ternary", 16),
                                  LayerPlan("int8", 0, "per_token")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_uncorrelated_inputs_rounds_as_rtn_through_the_interface(plan, act_order):
    """Every scheme, a short last group (16 does not divide 40), w8a8's 7-bit codes and a smoothing factor."""
    # int4's scale search weighs each column by the Hessian's diagonal (GPTQ) or evenly (RTN): the same only while
    # the smoothed Hessian s H s stays the identity
    smooth = torch.linspace(0.5, 2.0, 40) if plan.scheme != "int4" else torch.ones(40)
    rtn, gptq = _group([plan]), _group([plan], [_identity_gram(40)])
    for group in (rtn, gptq):
        group.smooth = [smooth]
    assert RoundToNearest().apply(rtn) == []
    assert Gptq(damp=0.0, act_order=act_order).apply(gptq) == []
    (codes, scale), (ref_codes, ref_scale) = gptq.codes[0], rtn.codes[0]
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # RTN rounds the weight the layer holds, W / smooth, at the plan's code range
    expected = quantize_weight(rtn.weights[0] / smooth, plan.scheme, plan.group_size,
                               W8A8_QMAX if plan.activations != "none" else None)
    assert torch.equal(ref_codes, expected[0])


def test_gptq_names_input_features_no_calibration_batch_reached():
    acc = GramAccumulator(40)
    x = torch.randn(64, 40)
    x[:, 3] = 0
    acc.add(x)
    group = _group([LayerPlan("int8", 0)], [acc])
    notes = Gptq().apply(group)
    assert [(d.target, d.level) for d in notes] == [("l0", "warning")] and "1 input feature(s)" in notes[0].message
    assert group.codes[0] is not None


def test_smoothquant_gives_every_layer_of_a_group_one_factor_and_says_why():
    stats = SmoothStats(40, keep_rows=0)
    x = torch.randn(256, 40)
    x[:, 5] *= 50  # an outlier channel
    stats.add(x)
    group = _group([LayerPlan("int8", 0, "per_tensor")] * 3, [stats, None, None])
    notes = SmoothQuant(alpha=0.5).apply(group)
    assert len(notes) == 1 and notes[0].target == "l0 (+2)" and "alpha=0.5" in notes[0].message
    assert group.smooth[0] is not None and all(torch.equal(s, group.smooth[0]) for s in group.smooth)
    assert group.smooth[0][5] < group.smooth[0].median()  # the outlier channel is divided down
    off = _group([LayerPlan("int8", 0, "per_tensor")], [stats])
    SmoothQuant(alpha=0.0).apply(off)
    assert off.smooth == [None]  # alpha=0: no factor, no Mul


def test_algorithms_name_the_statistic_they_read():
    assert RoundToNearest().statistic(8) is None and not RoundToNearest.sequential
    assert isinstance(Gptq().statistic(8), GramAccumulator) and Gptq.sequential
    assert SmoothQuant(alpha=None).statistic(8).keep_rows > 0 and SmoothQuant(alpha=0.5).statistic(8).keep_rows == 0
    assert isinstance(rounding("gptq", damp=0.05, act_order=False), Gptq)
    with pytest.raises(ValueError, match="method='awq'.*choose from rtn, gptq"):
        rounding("awq", damp=0.01, act_order=True)
