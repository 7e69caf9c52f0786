"""prune(reconstruct=true): the layers that read pruned channels are refit by least squares on calibration inputs."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graphopt as go
from graphopt.analysis.calibration import GramAccumulator, layer_input_stats
from graphopt.frontend.inputs import as_example_inputs
from graphopt.helpers.zoo import hf_model
from graphopt.passes.prune.reconstruct import refit

from .prune_models import ConcatSkip


class CopiedChannels(nn.Module):
    """An MLP whose 6 weakest hidden channels carry nothing new: 4 are scaled copies of others, 2 are constant."""

    def __init__(self, d: int = 16, hidden: int = 24):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        with torch.no_grad():
            for copy, source in zip(range(18, 22), range(4)):  # relu(0.01 z) = 0.01 relu(z)
                self.up.weight[copy] = 0.01 * self.up.weight[source]
                self.up.bias[copy] = 0.01 * self.up.bias[source]
            self.up.weight[22:] = 0.0  # relu(b) with b > 0: a constant, for the bias to take over
            self.up.bias[22:] = 0.5
            self.down.weight[:, 18:] *= 0.1

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def _error(model: nn.Module, pruned: nn.Module, inputs) -> float:
    with torch.no_grad():
        a, b = as_example_inputs(inputs).call(model), as_example_inputs(inputs).call(pruned)
    if isinstance(a, dict) or hasattr(a, "keys"):
        a, b = a["last_hidden_state"], b["last_hidden_state"]
    return float((a - b).pow(2).mean() / a.pow(2).mean())


def _prune(model, inputs, pipeline, calib):
    return go.optimize(model, inputs, pipeline, calib=calib, measure=False, on_error="raise")


def test_refit_recovers_channels_that_are_copies_or_constants():
    torch.manual_seed(0)
    model = CopiedChannels().eval()
    calib = [torch.randn(8, 16) for _ in range(4)]
    held = torch.randn(32, 16)  # not seen by the refit
    plain = _prune(model, calib[0], "prune(ratio=0.25)", calib)
    refitted = _prune(model, calib[0], "prune(ratio=0.25,reconstruct=true)", calib)
    assert refitted.model.down.weight.shape == (16, 18) == plain.model.down.weight.shape
    assert torch.equal(refitted.model.up.weight, model.up.weight[:18])  # the producer is only cut
    assert _error(model, refitted.model, held) < 0.1 * _error(model, plain.model, held)
    assert refitted.report.records[1].stats["layers_refit"] == 1
    # without the ridge towards the plain cut, the fit is exact; without the bias, the constants stay lost
    stats = layer_input_stats(model, {"down": model.down}, calib, GramAccumulator)["down"]
    kept = np.arange(24) < 18
    errors = []
    for bias in (model.down.bias, None):
        weight, new_bias = refit(model.down.weight.detach(), bias, stats, kept, damp=0.0)
        with torch.no_grad():
            out = F.relu(model.up(held))[:, :18] @ weight.T + (0 if new_bias is None else new_bias)
            expected = model(held)
        errors.append(float((out - expected).pow(2).mean() / expected.pow(2).mean()))
    assert errors[0] < 1e-12 and errors[1] > 1e-3


def test_refit_lowers_the_held_out_error_of_a_pruned_llama_mlp():
    model, inputs = hf_model("llama")
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 128, (8, 16), generator=g)} for _ in range(16)]
    held = {"input_ids": torch.randint(0, 128, (8, 16), generator=g)}
    plain = _prune(model, inputs, "prune(ratio=0.3,where=*.mlp.*)", calib)
    refit = _prune(model, inputs, "prune(ratio=0.3,where=*.mlp.*,reconstruct=true,calib_batches=16)", calib)
    record = refit.report.records[1]
    assert record.stats["layers_refit"] == 2  # one down_proj per block
    for a, b in zip(plain.model.parameters(), refit.model.parameters()):
        assert a.shape == b.shape
    assert _error(model, refit.model, held) < 0.85 * _error(model, plain.model, held)  # measured 0.74


def test_refit_one_by_one_convolutions_and_say_which_readers_are_not():
    torch.manual_seed(0)
    model = ConcatSkip().eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    held = torch.randn(8, 3, 8, 8)
    plain = _prune(model, calib[0], "prune(ratio=0.25)", calib)
    refit = _prune(model, calib[0], "prune(ratio=0.25,reconstruct=true)", calib)
    assert refit.report.records[1].stats["layers_refit"] == 2  # mix and head: both 1x1
    assert _error(model, refit.model, held) < 0.7 * _error(model, plain.model, held)

    model, inputs = hf_model("resnet")
    res = _prune(model, inputs, "prune(ratio=0.25,reconstruct=true)", [inputs])
    notes = [d.message for d in res.report.records[1].diagnostics]
    assert any("not refit after pruning its inputs: a convolution other than 1x1" in n for n in notes)


def test_a_tied_reader_is_left_as_it_is_and_noted():
    from .prune_models import TiedLM

    torch.manual_seed(0)
    model = TiedLM().eval()
    calib = [torch.randint(0, 50, (2, 7)) for _ in range(2)]
    res = _prune(model, calib[0], "prune(ratio=0.25,reconstruct=true)", calib)
    notes = [(d.target, d.message) for d in res.report.records[1].diagnostics]
    assert any("its weight is tied to" in m for _, m in notes)
    assert res.model.out.weight is res.model.emb.weight


def test_reconstruct_needs_calibration_data():
    model, inputs = CopiedChannels().eval(), torch.randn(4, 16)
    res = go.optimize(model, inputs, "prune(ratio=0.25,reconstruct=true)", measure=False)
    assert "needs calibration data" in res.report.records[1].reason
    assert res.model.down.weight.shape == (16, 24)


def test_layer_input_stats_reads_a_convolution_per_position():
    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 5, 5)
    stats = layer_input_stats(conv, {"": conv}, [x], GramAccumulator)[""]
    rows = x.movedim(1, -1).reshape(-1, 3).double()
    assert stats.rows == 50
    assert torch.allclose(stats.gram, rows.T @ rows) and torch.allclose(stats.total, rows.sum(0))
