"""Pass contract, verification after every pass, rollback, and the caller's model staying intact."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphopt as go


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@go.register_pass("t_scale_fc2", replace=True)
def scale_fc2(program, am, *, factor: float = 2.0):
    """Scale fc2's weight (a lossy change unless factor == 1)."""
    program.set_tensor("fc2.weight", program.tensor("fc2.weight") * factor)
    return go.PassResult(modified=True, stats={"scaled": 1})


@go.register_pass("t_raises", replace=True)
def raises(program, am):
    program.replace_module("fc1", nn.Linear(8, 3))  # half-done edit before the error
    raise RuntimeError("boom")


@go.register_pass("t_returns_none", replace=True)
def returns_none(program, am):
    return None


@go.register_pass("t_shape_change", tolerance=None, replace=True)
def shape_change(program, am):
    program.replace_module("fc2", nn.Linear(16, 5))
    return go.PassResult(modified=True)


@go.register_pass("t_lossy", tolerance=None, replace=True)
def lossy(program, am, *, factor: float = 1.1):
    program.set_tensor("fc2.bias", program.tensor("fc2.bias") * factor + 1.0)
    return go.PassResult(modified=True)


@go.register_pass("t_needs_calib", needs_calibration=True, replace=True)
def needs_calib(program, am):
    return go.PassResult(modified=False, stats={"batches": len(list(program.calib))})


def test_function_pass_becomes_dataclass_with_options():
    cls = go.get_pass("t_scale_fc2")
    assert issubclass(cls, go.Pass) and cls().factor == 2.0 and cls(factor=3).factor == 3
    assert cls.doc() == "Scale fc2's weight (a lossy change unless factor == 1)."
    assert str(go.parse_pipeline("t_scale_fc2(factor=1.0)")) == "t_scale_fc2(factor=1.0)"


def test_exact_pass_changing_outputs_is_rolled_back_and_reported():
    model, x = Tiny().eval(), torch.randn(5, 8)
    before = _state(model)
    res = go.optimize(model, x, "remove_dropout,t_scale_fc2(factor=3.0),t_scale_fc2(factor=1.0)")
    statuses = [r.status for r in res.report.records]
    assert statuses == ["baseline", "ok", "rolled back", "ok"]
    bad = res.report.records[2]
    assert "exceeds the pass's tolerance" in bad.reason
    assert bad.reproduce.endswith("--pipeline 'remove_dropout,t_scale_fc2(factor=3.0)'")
    assert torch.allclose(res.model(x), model(x), atol=1e-6)  # the optimised model kept its answers
    assert isinstance(res.model.drop, nn.Identity)
    assert _same_state(before, _state(model)) and isinstance(model.drop, nn.Dropout)  # caller untouched


def test_raising_pass_is_rolled_back_including_its_edits():
    model, x = Tiny().eval(), torch.randn(5, 8)
    res = go.optimize(model, x, "t_raises,remove_dropout")
    rec = res.report.records[1]
    assert rec.status == "rolled back" and rec.reason == "RuntimeError: boom"
    assert res.model.fc1.out_features == 16  # the half-done replace was undone
    assert {e.by for e in res.program.edits} == {"remove_dropout"}  # edit log truncated too
    assert res.report.records[2].status == "ok"


def test_pass_must_return_pass_result():
    res = go.optimize(Tiny(), torch.randn(2, 8), "t_returns_none")
    assert "must return go.PassResult" in res.report.records[1].reason


def test_lossy_pass_is_checked_for_shapes_but_not_tolerance():
    model, x = Tiny().eval(), torch.randn(5, 8)
    res = go.optimize(model, x, "t_lossy,t_shape_change")
    ok, bad = res.report.records[1:]
    assert ok.status == "ok" and ok.max_abs_err > 0.5 and ok.step_rel_err > 0 and ok.cosine < 1.0
    assert bad.status == "rolled back" and "shape (5, 5) differs from (5, 4)" in bad.reason


def test_on_error_raise_rolls_back_and_raises():
    model, x = Tiny().eval(), torch.randn(5, 8)
    before = _state(model)
    with pytest.raises(go.PassFailedError, match="boom") as info:
        go.optimize(model, x, "remove_dropout,t_raises,t_lossy", on_error="raise")
    assert [r.status for r in info.value.report.records] == ["baseline", "ok", "rolled back"]
    assert _same_state(before, _state(model))


def test_inplace_changes_callers_model_and_rollback_keeps_identity():
    model, x = Tiny().eval(), torch.randn(5, 8)
    expected = model(x)
    res = go.optimize(model, x, "remove_dropout,t_raises", inplace=True)
    assert res.model is model and isinstance(model.drop, nn.Identity)
    assert model.fc1.out_features == 16 and torch.allclose(model(x), expected)


def test_needs_calibration_fails_clearly_and_works_with_generator():
    res = go.optimize(Tiny(), torch.randn(2, 8), "t_needs_calib")
    assert "needs calibration data" in res.report.records[1].reason
    calib = (torch.randn(2, 8) for _ in range(3))  # one-shot iterator: materialised once
    res = go.optimize(Tiny(), torch.randn(2, 8), "t_needs_calib", calib=calib)
    assert res.report.records[1].status == "unchanged" and res.report.records[1].stats == {"batches": 3}


@pytest.mark.parametrize("inputs", [torch.randn(3, 8), (torch.randn(3, 8),), {"x": torch.randn(3, 8)}])
def test_example_input_forms(inputs):
    res = go.optimize(Tiny(), inputs, "remove_dropout")
    assert res.report.records[1].status == "ok"


def test_bad_arguments():
    with pytest.raises(go.InputError, match="tensor, a tuple/list"):
        go.optimize(Tiny(), 3.0, "remove_dropout")
    with pytest.raises(TypeError, match="needs an nn.Module"):
        go.optimize(lambda x: x, torch.randn(1), "remove_dropout")
    with pytest.raises(go.PipelineError):
        go.optimize(Tiny(), torch.randn(1, 8), "no_such_pass")
    with pytest.raises(go.VerificationError, match="does not run on its example inputs"):
        go.optimize(Tiny(), torch.randn(1, 3), "remove_dropout")


def test_report_rows_measure_the_model():
    model, x = Tiny().eval(), torch.randn(4, 8)
    res = go.optimize(model, x, "remove_dropout")
    base, row = res.report.records
    n_params = sum(p.numel() for p in model.parameters())
    assert base.params == row.params == n_params
    assert base.flops == 2 * 4 * (8 * 16 + 16 * 4)  # two matmuls; FlopCounterMode counts 2*m*n*k
    assert base.latency_ms > 0 and row.latency_ms > 0
    assert row.max_abs_err == 0.0 and row.cosine == 1.0 and row.stats == {"removed": 1}
    text = str(res.report)
    assert "remove_dropout" in text and "latency ms" in text and "cosine" in text and "removed=1" in text
    data = json.loads(res.report.to_json())
    assert data["pipeline"] == "remove_dropout" and data["records"][1]["status"] == "ok"


def test_analyses_are_cached_and_invalidated_by_preservation():
    calls = []

    @go.register_analysis("t_count")
    def count(program, am):
        calls.append(1)
        return len(list(program.module.modules()))

    @go.register_pass("t_keeps", replace=True)
    def keeps(program, am, *, keep: bool = True):
        am.get("t_count")
        program.set_tensor("fc1.bias", program.tensor("fc1.bias").clone())
        return go.PassResult(modified=True, preserved=frozenset({"t_count"}) if keep else frozenset())

    program = go.Program(Tiny().eval(), torch.randn(2, 8))
    manager = go.PassManager(go.parse_pipeline("t_keeps,t_keeps,t_keeps(keep=false),t_keeps"), measure=False)
    manager.run(program)
    assert len(calls) == 2  # computed once, kept twice, dropped, recomputed
    with pytest.raises(KeyError, match="did you mean 't_count'"):
        program.analyses.get("t_cuont")


def test_registration_errors():
    with pytest.raises(ValueError, match="needs a default value"):
        @go.register_pass("t_bad_fn")
        def bad(program, am, *, opt):
            return go.PassResult(False)

    with pytest.raises(ValueError, match="already registered"):
        @go.register_pass("remove_dropout")
        @dataclass
        class Other(go.Pass):
            def run(self, program, am):
                return go.PassResult(False)

    with pytest.raises(ValueError, match="must be an identifier"):
        go.register_pass("has space")


def test_a_model_with_no_tensor_output_is_refused_before_any_pass():
    class Talks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return {"text": "hello", "n": 3}

    model = Talks()
    with pytest.raises(go.VerificationError, match="returns dict with no tensors.*logits, hidden states"):
        go.optimize(model, torch.randn(1, 2), "remove_dropout")


def test_report_names_compared_outputs_and_what_it_leaves_out():
    class Mixed(nn.Module):
        def forward(self, x):
            return {"y": x * 2, "label": "a string", "extra": (x + 1,)}

    res = go.optimize(Mixed(), torch.randn(3, 4), "remove_dropout", measure=False)
    assert res.report.outputs == ["y[3, 4]", "extra[0][3, 4]"]
    assert res.report.not_compared == ["label (str)"]
    assert "outputs compared: y[3, 4], extra[0][3, 4] (not compared: label (str))" in str(res.report)
    assert res.report.to_dict()["outputs"] == res.report.outputs


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_pass_is_rolled_back_before_the_interrupt_propagates(interrupt):
    """With inplace=True a Ctrl-C inside a pass once left a half-rewritten model in the caller's hands."""

    @go.register_pass("t_half_done", tolerance=None, replace=True)
    def half_done(program, am):
        program.replace_module("0", nn.Linear(4, 4))
        program.set_tensor("2.weight", torch.zeros(2, 4))
        raise interrupt()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(interrupt) as caught:
        go.optimize(model, torch.randn(3, 4), "remove_dropout,t_half_done", inplace=True, measure=False)
    after = model.state_dict()  # the interrupted pass: undone (the root is the caller's object, rolled back)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert isinstance(model[1], nn.Identity)  # the completed pass before it: kept
    assert any("rolled back" in n and "completed: remove_dropout" in n for n in caught.value.__notes__)
