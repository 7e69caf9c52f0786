"""prune on models where a careless pruner returns a model that runs and is wrong (issue 10).

Every hazard model is pruned after the units chosen for removal were made dead: removing dead units
is exact, so the pruned model must reproduce the zeroed original. Where a dim may not be cut
(normalising reductions, head_dim under a written-out scale, a shape branch) the tests also check
that prune says so and leaves it whole, and where it may (conv -> flatten -> Linear, transposed
convolutions, a plain sum) that it does cut.
"""

import copy

import pytest
import torch

import graphopt as go
from graphopt.frontend.inputs import as_example_inputs
from graphopt.passes.prune.prune import apply_plan

from .peer_suite_models import PEER_SUITE
from .prune_hazards import HAZARDS
from .prune_models import randomize_norms
from .test_prune import _kill_units
from .test_prune_property import _kill


def _outputs(model, inputs):
    with torch.no_grad():
        return as_example_inputs(inputs).call(model)


def _build(name):
    cls, make_input = HAZARDS[name]
    torch.manual_seed(0)
    return cls().eval(), make_input()


def _prune(model, x, pipeline="prune(ratio=0.5,importance=l2)"):
    return go.optimize(model, x, pipeline, measure=False, on_error="raise")


def _messages(res, level=None):
    return [d.message for d in res.report.records[1].diagnostics if level is None or d.level == level]


@pytest.mark.parametrize("name", list(HAZARDS))
def test_dead_units_are_removed_exactly_and_the_caller_keeps_its_model(name):
    model, x = _build(name)
    _kill_units(model, x, 0.5)
    expected = _outputs(model, x)
    state = copy.deepcopy(model.state_dict())
    res = _prune(model, x)
    err = go.compare_outputs(_outputs(res.model, x), expected)
    assert err.max_rel < 1e-4, f"{name}: {err}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("name", ["softmax_channels", "centered_channels", "variance_scaled", "logsumexp_shift",
                                  "max_shift", "scalar_mean_output"])
def test_normalising_reductions_freeze_the_reduced_dim(name):
    model, x = _build(name)
    graph = go.capture(model, x).analyses.get("dependency_graph")
    assert not graph.group_of("fc1.weight", 0)
    reasons = [r for f in graph.frozen if ("fc1.weight", 0) in f.members for r in f.reasons]
    assert any("couples all its units" in r for r in reasons), reasons
    assert any("couples all its units" in d.message for d in graph.diagnostics)


def test_a_sum_over_channels_is_exact_and_stays_prunable():
    model, x = _build("sum_gate")
    res = _prune(model, x)
    assert res.model.fc1.out_features == 4


def test_reductions_inside_a_recognised_norm_keep_the_width_prunable():
    """A written-out RMSNorm (as in HF models) is recognised by probing it, whatever its name; a module
    merely named like a norm that centres its input is not."""

    class RootMeanSquareScale(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, h):
            return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    class CentreNorm(torch.nn.Module):
        def forward(self, h):
            return h - h.mean(-1, keepdim=True)

    class Block(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.up, self.norm, self.down = torch.nn.Linear(6, 8), norm, torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.down(self.norm(self.up(x)))

    graph = go.capture(Block(RootMeanSquareScale(8)), torch.randn(2, 6)).analyses.get("dependency_graph")
    assert graph.group_of("up.weight", 0)
    graph = go.capture(Block(CentreNorm()), torch.randn(2, 6)).analyses.get("dependency_graph")
    assert not graph.group_of("up.weight", 0)


def test_head_dim_under_a_written_out_scale_is_kept_and_whole_heads_go():
    model, x = _build("scaled_hand_attention")
    graph = go.capture(model, x).analyses.get("dependency_graph")
    q_groups = graph.group_of("q.weight", 0)
    assert len(q_groups) == 1 and q_groups[0].units == 2  # the heads, not head_dim
    res = _prune(model, x)
    assert (res.model.heads, res.model.head_dim) == (1, 8)
    assert res.model.q.out_features == 8


@pytest.mark.parametrize("name, line", [("width_as_value", "h * self.width"),
                                        ("shape_branch", "h = h * 0.5"),
                                        ("parity_dispatch", "torch.tanh(h) if h.size(-1) % 4 == 2")])
def test_groups_that_change_the_traced_graph_are_left_whole_and_named(name, line):
    model, x = _build(name)
    res = _prune(model, x)
    assert res.model.fc1.out_features == model.fc1.out_features
    skipped = " ".join(_messages(res, "skipped"))
    assert "changes what the model computes" in skipped and line in skipped and "prune_hazards.py" in skipped


def test_a_branch_on_one_group_does_not_stop_the_others():
    class TwoGroups(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 12), torch.nn.Linear(12, 8)
            self.c = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.relu(self.b(h * 0.5 if h.shape[-1] > 8 else h))
            return self.c(h)

    model = TwoGroups()
    res = _prune(model, torch.randn(4, 5))
    assert res.model.a.out_features == 12 and res.model.b.out_features == 4


def test_parameters_the_graph_never_uses_are_left_alone_and_reported():
    model, x = _build("unused_parameters")
    res = _prune(model, x)
    assert res.model.spare.shape == (6, 4) and res.model.unused.weight.shape == (9, 7)
    assert res.model.fc1.out_features == 4
    graph = go.capture(model, x).analyses.get("dependency_graph")
    assert any("spare is never used" in d.message for d in graph.diagnostics)
    assert any(("unused.weight", 0) in f.members for f in graph.frozen)


@pytest.mark.parametrize("name, first, linear, per_channel", [("conv_flatten_linear", "c2", "fc1", 4),
                                                             ("conv_view_linear", "features.3", "classifier.0", 4)])
def test_conv_features_flattened_into_a_linear_prune_channels_with_their_columns(name, first, linear, per_channel,
                                                                                 tmp_path):
    model, x = _build(name)
    res = _prune(model, x)
    conv, fc = res.model.get_submodule(first), res.model.get_submodule(linear)
    assert conv.out_channels < model.get_submodule(first).out_channels
    assert fc.in_features == conv.out_channels * per_channel
    go.save(res, tmp_path)
    loaded = go.load(tmp_path, _build(name)[0])
    assert go.compare_outputs(_outputs(loaded, x), _outputs(res.model, x)).max_rel < 1e-6


def test_transposed_convolutions_prune_by_channel_and_by_group(tmp_path):
    model, x = _build("transposed_convs")
    res = _prune(model, x)
    m = res.model
    assert m.down.out_channels == 4 and m.up.in_channels == 4
    assert m.grouped.groups == 2 and m.grouped.in_channels == 6 and m.grouped.out_channels == 4
    assert m.dilated.out_channels == 3 and m.head.in_channels == 3
    go.save(res, tmp_path)
    loaded = go.load(tmp_path, _build("transposed_convs")[0])
    assert go.compare_outputs(_outputs(loaded, x), _outputs(m, x)).max_rel < 1e-6


@pytest.mark.parametrize("name", list(PEER_SUITE))
def test_torch_prunings_suite_shapes_prune_losslessly(name):
    """Models shaped like Torch-Pruning's own tests: dead units go exactly, every output keeps its shape, and
    every model but the one returning all its hidden dims gets smaller."""
    build, make_input = PEER_SUITE[name]
    torch.manual_seed(0)
    model = build().eval()
    randomize_norms(model)
    x = make_input()
    _kill(model, x, 0.5, seed=0)
    expected = _outputs(model, x)
    res = _prune(model, x)
    err = go.compare_outputs(_outputs(res.model, x), expected)
    assert err.max_rel < 1e-4, f"{name}: {err}"
    smaller = sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert smaller == (name != "all_outputs")


def test_a_hand_made_plan_that_flips_a_branch_is_refused_and_restored():
    model, x = _build("shape_branch")
    program = go.Program(model, x)
    with pytest.raises(RuntimeError, match=r"computes something else.*h = h \* 0.5"):
        apply_plan(program, {0: [0, 1, 2]})
    assert model.fc1.out_features == 12 and model.fc2.weight.shape == (3, 12)
