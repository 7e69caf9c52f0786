"""prune(allocation=knapsack): one ranking of Taylor scores per parameter or FLOP a unit costs, spending the target
where the outputs lose least; refused where its scores or its budget would mean nothing."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model


class TwoBranches(nn.Module):
    """Two hidden layers of 64 units read from the same input: a unit of ``cheap`` costs 16 + 1 + 16 parameters,
    one of ``dear`` 16 + 1 + 512 (its reader writes a second, wider output). ``dear``'s units matter twice as
    much each: per parameter they matter less than half as much."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cheap_up, self.cheap_down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.dear_up, self.dear_down = nn.Linear(16, 64), nn.Linear(64, 512)
        with torch.no_grad():  # a dear unit writes twice the output energy of a cheap one
            self.dear_down.weight.mul_((2 * 16 / 512) ** 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cheap_down(torch.relu(self.cheap_up(x))), self.dear_down(torch.relu(self.dear_up(x)))


def _relative_error(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, got = model(x), pruned(x)
    return float(sum((a - b).square().sum() for a, b in zip(ref, got)) / sum(a.square().sum() for a in ref))


def test_knapsack_cuts_where_a_unit_costs_most_for_what_it_carries():
    model = TwoBranches().eval()
    calib = [torch.randn(8, 16) for _ in range(8)]
    held = torch.randn(256, 16)
    total = sum(p.numel() for p in model.parameters())
    errors, widths = {}, {}
    for allocation in ("global", "knapsack"):
        res = go.optimize(model, torch.randn(2, 16), f"prune(target_params=0.7,importance=taylor,"
                          f"allocation={allocation},round_to=1)", calib=calib, measure=False, on_error="raise")
        kept = sum(p.numel() for p in res.model.parameters()) / total
        assert 0.66 < kept <= 0.7, (allocation, kept)
        widths[allocation] = (res.model.cheap_up.out_features, res.model.dear_up.out_features)
        errors[allocation] = _relative_error(model, res.model, held)
    cheap, dear = widths["knapsack"]
    assert 64 - dear > 2 * (64 - cheap), widths  # the dear branch pays most of the cut
    assert widths["global"][1] > dear, widths  # global's ranking, normalised per group, cuts it less
    assert errors["knapsack"] < 0.8 * errors["global"], errors


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_knapsack_meets_a_flops_target_on_models_it_was_not_written_for(name):
    model, inputs = hf_model(name)
    calib = [inputs] * 2
    base = go.optimize(model, inputs, "remove_dropout", on_error="raise").report.records[0].flops
    res = go.optimize(model, inputs, "prune(target_flops=0.75,importance=taylor,allocation=knapsack)",
                      calib=calib, on_error="raise")
    kept = res.report.records[1].flops / base
    assert 0.6 < kept <= 0.75, kept
    assert res.report.records[1].status == "ok"


@pytest.mark.parametrize("options, why", [
    ("target_params=0.7,allocation=knapsack", "give importance=taylor and target_params or target_flops"),
    ("ratio=0.3,importance=taylor,allocation=knapsack", "give importance=taylor and target_params or target_flops"),
])
def test_knapsack_without_taylor_scores_or_a_budget_is_refused(options, why):
    model = TwoBranches().eval()
    calib = [torch.randn(8, 16) for _ in range(2)]
    res = go.optimize(model, torch.randn(2, 16), f"prune({options})", calib=calib, measure=False)
    record = res.report.records[1]
    assert record.status == "rolled back" and why in record.reason
    assert res.model.dear_up.out_features == 64
