"""Bad input gets one clear error before anything runs, and the caller's model is untouched (issue 10).

Options are checked from their declarations (types and ``Range``) for text and Python alike;
calibration data against the example inputs; the verifier's tolerance follows the model's dtype;
export_onnx names inputs that do not fit and paths that are folders.
"""

import copy
import math

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import InputError
from graphopt.passes.dyt import DyTPass
from graphopt.passes.heal.heal import Heal
from graphopt.passes.prune.prune import Prune


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("text, match", [
    ("heal(eval_batches=0)", r"heal\(eval_batches=...\): 0 is out of range; it must be >= 1"),
    ("heal(warmup=-3)", r"warmup.*-3 is out of range; it must be >= 0"),
    ("heal(clip=-1)", r"clip.*-1.0 is out of range; it must be >= 0"),
    ("heal(lr=0)", r"lr.*must be > 0"),
    ("dyt(alpha0=-1)", r"alpha0.*must be > 0"),
    ("dyt(alpha0=nan)", r"alpha0.*nan is not a finite number"),
    ("dyt(alpha0=inf)", r"not a finite number"),
    ("prune(ratio=1)", r"ratio.*must be in \[0, 1\)"),
    ("prune(target_params=0)", r"must be in \(0, 1\]"),
    ("quantize(damp=1.5)", r"damp.*in \[0, 1\)"),
    ("quantize(group_size=-1)", r"group_size.*>= 0"),
])
def test_option_ranges_are_checked_when_the_pipeline_is_parsed(text, match):
    with pytest.raises(go.PipelineError, match=match):
        go.parse_pipeline(text)


def test_passes_built_in_python_are_checked_the_same_way():
    with pytest.raises(go.PipelineError, match=r"ratio.*expected float, got str '0.5'"):
        Prune(ratio="0.5")
    with pytest.raises(go.PipelineError, match="eval_batches"):
        Heal(eval_batches=0)
    with pytest.raises(go.PipelineError, match="not a finite number"):
        DyTPass(alpha0=math.nan)
    assert Prune(ratio=0).ratio == 0.0 and isinstance(Prune(ratio=0).ratio, float)


def test_numpy_numbers_are_accepted_and_widened():
    import numpy as np

    p = Prune(ratio=np.float32(0.25), round_to=np.int64(2))
    assert (p.ratio, p.round_to) == (0.25, 2) and type(p.round_to) is int


@pytest.mark.parametrize("calib, match", [
    ({"x": torch.randn(4, 5)}, r"calib is one dict of inputs; pass a list of such dicts"),
    (torch.randn(8, 5), r"calib is one tensor float32\[8, 5\]: iterating it would give its rows as 1-D batches"),
    ("some text", r"calib is a string"),
    (["a docstring", "another"], r"calib batch 0 is a str.*tokenize texts first"),
    ([torch.randn(4, 5), torch.randn(4, 5).double()], r"calib batch 1 .*dtype float64 where example_inputs has "
                                                      r"float32"),
    ([torch.randint(0, 3, (4, 5))], r"calib batch 0 .*dtype int64 where example_inputs has float32"),
    ([torch.randn(4, 5), torch.randn(4, 7)], r"calib batch 1 does not run through the model \(RuntimeError: "
                                             r"mat1 and mat2.*\n  example_inputs: float32\[4, 5\]\n  batch 1: "
                                             r"float32\[4, 7\]"),
    ([torch.randn(5)], r"calib batch 0 .*1 dims \[5\] where example_inputs has \[4, 5\]"),
    ([(torch.randn(4, 5), torch.randn(4, 5))], r"2 positional inputs instead of 1"),
])
def test_calibration_data_is_checked_before_any_pass(calib, match):
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=match):
        go.optimize(model, torch.randn(4, 5), "prune(importance=taylor)", calib=calib, measure=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_calibration_keywords_must_fit_forward():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x, mask=None):
            return self.fc(x if mask is None else x * mask)

    x = {"x": torch.randn(4, 5), "mask": torch.ones(4, 5)}
    with pytest.raises(InputError, match=r"calib batch 2 does not match example_inputs: forward\(\) takes no input "
                                         r"'y'; lacks 'x', which forward\(\) requires"):
        go.optimize(Kw(), x, "remove_dropout", calib=[x, x, {"y": torch.ones(4, 5)}])
    batches = [x, {"x": torch.randn(2, 5)}, {"x": torch.randn(3, 5), "mask": torch.ones(3, 5)}]
    res = go.optimize(Kw(), x, "remove_dropout", calib=batches, measure=False)  # an optional input may be left out
    assert res.report.records[-1].status == "unchanged"
    assert res.report.records[-1].status == "unchanged"


def test_optimize_flags_are_checked():
    model = _mlp()
    for kwargs, err, match in [({"on_error": "ignore"}, ValueError, "choose 'rollback' or 'raise'"),
                               ({"inplace": "yes"}, TypeError, r"inplace=...\) takes true or false"),
                               ({"measure": 3}, TypeError, "go.Measure"),
                               ({"progress": "on"}, TypeError, "progress"),
                               ({"model_spec": 4}, TypeError, "model_spec")]:
        with pytest.raises(err, match=match):
            go.optimize(model, torch.randn(2, 5), "remove_dropout", **kwargs)


def test_tolerance_follows_the_model_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    res = go.optimize(model.half(), torch.randn(2, 3, 8, 8).half(), "fold_bn", measure=False)
    record = res.report.records[1]
    assert record.status == "ok" and 1e-5 < record.step_rel_err < 8 * torch.finfo(torch.float16).eps


def test_outputs_that_are_not_finite_to_begin_with_are_named():
    class Inf(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c(x)) / 0.0

    res = go.optimize(Inf().eval(), torch.randn(1, 3, 4, 4), "fold_bn", measure=False)
    assert "not finite before this pass either" in res.report.records[1].reason
    assert any("not finite before any pass" in n for n in res.report.notes)


def test_export_onnx_names_inputs_that_do_not_fit_and_folder_paths(tmp_path):
    model = _mlp()
    with pytest.raises(InputError, match=r"does not run on these example inputs \(float32\[2, 7\]\): RuntimeError"):
        go.export_onnx(model, torch.randn(2, 7), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"is a directory; give the path of the .onnx file"):
        go.export_onnx(model, torch.randn(2, 5), tmp_path)
    assert not list(tmp_path.iterdir())
