"""export_onnx: dynamo export, dynamic axes re-checked at other sizes, onnxruntime vs torch, refusals."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.emit import onnx_export
from graphopt.emit.onnx_export import OnnxExportError, OnnxVerificationError
from graphopt.frontend.inputs import flatten_outputs
from graphopt.helpers.zoo import hf_model


def _snapshot(model: nn.Module) -> tuple[dict, dict, int, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    return state, flags, hooks, attrs


def _assert_intact(model: nn.Module, before: tuple[dict, dict, int, dict]) -> None:
    state, flags, hooks, attrs = _snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1]
    assert hooks == before[2]  # e.g. transformers' output-capturing hooks are not left behind
    assert attrs == before[3]


def _ort(path: os.PathLike, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})


def _grow(inputs: dict[str, torch.Tensor], batch: int, seq: int | None) -> dict[str, torch.Tensor]:
    """Inputs with another batch (and seq) size, values repeated cyclically (ids stay valid)."""
    out = {}
    for k, t in inputs.items():
        t = t.index_select(0, torch.arange(batch) % t.shape[0])
        if seq is not None:
            t = t.index_select(1, torch.arange(seq) % t.shape[1])
        out[k] = t
    return out


#: the name ending of one weight per attention layer in each HF test model
ATTENTION_WEIGHT = {"bert": "attention.self.query.weight", "gpt2": "attn.c_attn.weight",
                    "llama": "self_attn.q_proj.weight", "vit": "attention.q_proj.weight"}

HF_CASES = {  # name -> (dynamic_axes, output names)
    "bert": ({"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
             ["last_hidden_state", "pooler_output", "hidden_states_0", "hidden_states_1", "hidden_states_2"]),
    "gpt2": ("auto", ["last_hidden_state"]),
    "llama": ("auto", ["last_hidden_state"]),  # GQA: 4 query heads, 2 KV heads
    "vit": ({"pixel_values": {0: "batch"}}, ["last_hidden_state", "pooler_output"]),
    "resnet": ("auto", ["last_hidden_state", "pooler_output"]),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_models_export_with_dynamic_axes_and_match_torch(name, tmp_path):
    model, tensors = hf_model(name)
    axes, out_names = HF_CASES[name]
    text = "input_ids" in tensors
    # BERT also covers a non-tensor option that goes through **kwargs, nested outputs and external data
    options = {"output_hidden_states": True} if name == "bert" else {}
    before = _snapshot(model)
    report = go.export_onnx(model, {**tensors, **options}, tmp_path / f"{name}.onnx", dynamic_axes=axes,
                            external_data=name == "bert")

    _assert_intact(model, before)
    assert os.fspath(report) == str(tmp_path / f"{name}.onnx") and report.path.exists()
    assert report.external_data == (name == "bert")
    data = tmp_path / f"{name}.onnx.data"
    assert report.size_bytes == report.path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    assert list(report.outputs) == out_names
    assert list(report.inputs) == list(tensors)
    for shape in report.inputs.values():
        assert shape[0] == "batch" and (shape[1] == "seq") == text
    # verified on the example shape and on grown dynamic axes, both within tolerance
    assert len(report.runs) == 2 and report.verified
    assert ("[3, 19]" if text else "[3, 3, 32, 32]") in report.runs[1].inputs
    assert 0 <= report.max_abs_error < 1e-4
    onnx.checker.check_model(str(report.path))
    # opset 23 (the default): each attention is one Attention node, not its ~25-node decomposition
    graph = onnx.load(str(report.path), load_external_data=False).graph
    layers = sum(1 for k in model.state_dict() if k.endswith(ATTENTION_WEIGHT.get(name, "\0")))
    assert report.opset == 23 and sum(n.op_type == "Attention" for n in graph.node) == layers
    assert (layers > 0) == (name != "resnet")

    # independently: the file runs at yet another size and matches torch
    grown = _grow(tensors, batch=4, seq=7 if text else None)
    with torch.no_grad():
        ref = list(flatten_outputs(model(**grown, **options)).values())
    got = _ort(report.path, grown)
    assert len(got) == len(ref) == len(out_names)
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-3)


def test_older_opset_on_request_decomposes_attention_and_still_matches(tmp_path):
    model, tensors = hf_model("bert")
    report = go.export_onnx(model, tensors, tmp_path / "bert18.onnx", dynamic_axes="auto", opset=18)
    ops = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert report.verified and report.opset == 18
    assert "Attention" not in ops and {"Softmax", "MatMul"} <= ops


class TupleNet(nn.Module):
    """Positional inputs and nested tuple/dict/list outputs, with dropout and batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x, y, scale: float = 2.0):
        h = self.bn(self.drop(self.fc(x)))
        return h, {"gate": torch.sigmoid(h) * y, "parts": [h.sum(-1), (h * scale).argmax(-1)]}


def test_own_model_tuple_outputs_positional_inputs_training_restored(tmp_path):
    torch.manual_seed(1)
    model = TupleNet()
    model.train()  # exported in eval mode, restored afterwards
    model.bn.running_mean.normal_()
    x, y = torch.randn(3, 6), torch.randn(3, 5)
    before = _snapshot(model)
    axes = {"x": [0], "y": {0: "x_dim0"}}  # a list of axes names them <input>_dim<axis>
    report = go.export_onnx(model, (x, y), tmp_path / "tuple.onnx", dynamic_axes=axes)

    _assert_intact(model, before)
    assert model.training and model.drop.training
    assert list(report.inputs) == ["x", "y"] and report.inputs["x"] == ("x_dim0", 6)
    assert list(report.outputs) == ["output_0", "output_1.gate", "output_1.parts_0", "output_1.parts_1"]
    assert report.outputs["output_1.parts_1"] == ("x_dim0",)
    assert [r.inputs for r in report.runs] == ["x[3, 6], y[3, 5]", "x[4, 6], y[4, 5]"]
    model.eval()
    with torch.no_grad():
        ref = flatten_outputs(model(x, y))
    got = _ort(report, {"x": x, "y": y})
    np.testing.assert_allclose(got[1], ref["output[1].gate"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(got[3], ref["output[1].parts[1]"].numpy())  # int64 argmax: exact


class KwargsNet(nn.Module):
    """Inputs through ``**kwargs``, which torch.export cannot mark dynamic directly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **extra):
        return self.fc(x) + extra["bias"].unsqueeze(-1)


def test_inputs_through_var_keyword_can_be_dynamic(tmp_path):
    x, bias = torch.randn(2, 4), torch.randn(2)
    model = KwargsNet().eval()
    report = go.export_onnx(model, {"x": x, "bias": bias}, tmp_path / "kw.onnx",
                            dynamic_axes={"x": {0: "batch"}, "bias": {0: "batch"}})
    assert report.inputs == {"x": ("batch", 4), "bias": ("batch",)}
    assert len(report.runs) == 2
    x5, b5 = torch.randn(5, 4), torch.randn(5)
    with torch.no_grad():
        ref = model(x5, bias=b5)
    np.testing.assert_allclose(_ort(report, {"x": x5, "bias": b5})[0], ref.numpy(), atol=1e-5)


# --- refusals --------------------------------------------------------------------------------------

@torch.library.custom_op("graphopt_onnx_test::plus_one", mutates_args=())
def _plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@_plus_one.register_fake
def _(x):
    return torch.empty_like(x)


def _plus_one_wrong_onnx(x):
    from onnxscript import opset18 as op

    return op.Add(x, op.CastLike(1.01, x))  # off by 0.01: outside atol=1e-4 + rtol=1e-3*|x+1|


WRONG = {torch.ops.graphopt_onnx_test.plus_one.default: _plus_one_wrong_onnx}


class PlusOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.ops.graphopt_onnx_test.plus_one(self.fc(x))


def test_disagreement_with_torch_is_refused_and_file_moved_aside(tmp_path):
    path = tmp_path / "wrong.onnx"
    path.write_bytes(b"stale")  # an older file at the path must not survive a refused export
    model = PlusOne().eval()
    with pytest.raises(OnnxVerificationError) as info:
        go.export_onnx(model, torch.randn(2, 4), path, custom_translations=WRONG)
    message = str(info.value)
    assert "disagrees with torch" in message and "'output'" in message and "atol=0.0001" in message
    assert "max abs error 0.01" in message
    assert not path.exists()
    failed = tmp_path / "wrong.onnx.failed"
    assert info.value.failed_path == failed and failed.exists() and str(failed) in message
    onnx.checker.check_model(str(failed))  # kept for inspection: a real model, just a wrong one


def test_wrong_translation_passes_with_loose_tolerance(tmp_path):
    model = PlusOne().eval()
    report = go.export_onnx(model, torch.randn(2, 4), tmp_path / "loose.onnx", atol=0.02,
                            custom_translations=WRONG)
    assert 0.009 < report.max_abs_error < 0.011


class BranchOnBatch(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x  # torch.export specialises the batch size to 2


def test_dynamic_axis_the_model_specialises_is_refused(tmp_path):
    path = tmp_path / "branch.onnx"
    with pytest.raises(OnnxVerificationError,
                       match=r"specialised to the example shape: dynamic axis 'batch' \(axis 0 of 'x'\) "
                             r"has the fixed size 2"):
        go.export_onnx(BranchOnBatch(), torch.randn(2, 3), path, dynamic_axes={"x": {0: "batch"}})
    assert not path.exists() and (tmp_path / "branch.onnx.failed").exists()


def test_onnxruntime_failing_at_other_sizes_is_refused(tmp_path, monkeypatch):
    # Second line of defence: the input dims look dynamic but the graph only runs at the example shape.
    monkeypatch.setattr(onnx_export, "dynamic_shapes", lambda *a, **k: None)
    monkeypatch.setattr(onnx_export, "check_dynamic_dims", lambda *a, **k: None)
    path = tmp_path / "static.onnx"
    with pytest.raises(OnnxVerificationError, match=r"input\[3, 4\]; the graph is probably specialised"):
        go.export_onnx(nn.Linear(4, 2).eval(), torch.randn(2, 4), path, dynamic_axes={"input": {0: "batch"}})
    assert not path.exists() and (tmp_path / "static.onnx.failed").exists()


class EvenBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1) * 2  # needs an even batch: batch+1 is rejected by torch itself


def test_regrows_dynamic_axes_when_torch_rejects_the_first_sizes(tmp_path):
    report = go.export_onnx(EvenBatch(), torch.randn(2, 3), tmp_path / "even.onnx",
                            dynamic_axes={"x": {0: "b"}})
    assert [r.inputs for r in report.runs] == ["x[2, 3]", "x[4, 3]"] and not report.notes


def test_meta_model_is_refused(tmp_path):
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        go.export_onnx(model, torch.randn(2, 4), tmp_path / "meta.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("axes, match", [
    ({"x": {0: "batch"}}, r"unknown input 'x'; the model's tensor inputs are 'input'"),
    ({"input": {2: "batch"}}, r"axis 2 is out of range.*\[2, 4\]"),
    ({"input": {1: "feat size"}}, r"must be an identifier"),
    ({"input": "batch"}, r"must map axis -> name"),
    ("batch", r"or 'auto'"),
])
def test_bad_dynamic_axes_give_clear_errors(axes, match, tmp_path):
    with pytest.raises((ValueError, TypeError), match=match):
        go.export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "bad.onnx", dynamic_axes=axes)


def test_dynamic_axes_need_size_two_and_consistent_sizes(tmp_path):
    model = KwargsNet()
    with pytest.raises(ValueError, match=r"size 1 .*size >= 2"):
        go.export_onnx(model, {"x": torch.randn(1, 4), "bias": torch.randn(1)}, tmp_path / "a.onnx",
                       dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(ValueError,
                       match=r"'batch' is axis 0 of 'x' \(size 2\) and axis 0 of 'bias' \(size 3\)"):
        go.export_onnx(model, {"x": torch.randn(2, 4), "bias": torch.randn(3)}, tmp_path / "b.onnx",
                       dynamic_axes={"x": {0: "batch"}, "bias": {0: "batch"}})


def test_untraceable_model_gives_export_error(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(OnnxExportError,
                       match=r"ONNX export of Branchy on float32\[2, 3\] failed in torch.export") as info:
        go.export_onnx(Branchy(), torch.ones(2, 3), tmp_path / "branchy.onnx")
    message = str(info.value)
    assert not isinstance(info.value, OnnxVerificationError)
    assert "data-dependent control flow" in message and "torch.cond" in message  # capture's diagnosis
    assert "test_onnx_export.py" in message and "x.sum() > 0" in message  # the failing source line
    assert not (tmp_path / "branchy.onnx").exists()


def test_inputs_that_do_not_fit_forward_are_rejected(tmp_path):
    with pytest.raises(TypeError, match=r"do not fit Linear.forward"):
        go.export_onnx(nn.Linear(4, 2), {"inputs": torch.randn(2, 4)}, tmp_path / "x.onnx")


# --- integration ---------------------------------------------------------------------------------

def test_graphopt_kernel_ops_export_through_their_translation(tmp_path):
    from graphopt.kernels.dyt import dyt

    class DyTNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.alpha = nn.Parameter(torch.tensor([0.7]))
            self.weight = nn.Parameter(torch.randn(8))
            self.bias = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return dyt(self.fc(x), self.alpha, self.weight, self.bias)

    report = go.export_onnx(DyTNet().eval(), torch.randn(2, 3, 8), tmp_path / "dyt.onnx")
    proto = onnx.load(str(report.path))
    assert "Tanh" in {n.op_type for n in proto.graph.node} and report.max_abs_error < 1e-5


def test_optimize_result_exports_without_verification_when_asked(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 2))
    res = go.optimize(model, torch.randn(3, 4), pipeline="remove_dropout", measure=False)
    report = res.export_onnx(tmp_path / "seq.onnx", check=False, dynamic_axes="auto")
    assert not report.verified and "NOT verified" in str(report)
    assert report.inputs == {"input": ("batch", 4)}
    x = torch.randn(5, 4)
    with torch.no_grad():
        ref = res.model(x)
    np.testing.assert_allclose(_ort(report, {"input": x})[0], ref.numpy(), atol=1e-5)
