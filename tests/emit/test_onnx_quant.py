"""Quantized layers in ONNX: QDQ, MatMulNBits and w8a8 integer ops, checked in onnxruntime against torch."""

import collections

import numpy as np
import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.emit.onnx_quant import QuantLoweringError
from graphopt.helpers.zoo import hf_model
from graphopt.nn.quant import QuantLinear

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _ops(path):
    model = onnx.load(str(path))
    return model, collections.Counter(n.op_type for n in model.graph.node)


def _layer(k=37, n=11, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    return QuantLinear.from_linear(lin.weight, lin.bias, **kw)


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int8", 16), ("int4", 16), ("int4", 0), ("ternary", 0)])
@pytest.mark.parametrize("k", [64, 37])  # K a multiple of the group, and not
def test_weight_only_layers_export_as_qdq(tmp_path, scheme, group, k):
    layer = _layer(k, scheme=scheme, group_size=group)
    report = go.export_onnx(layer, torch.randn(2, 5, k), tmp_path / "q.onnx", atol=1e-5)
    assert report.verified and report.opset >= 21
    model, ops = _ops(tmp_path / "q.onnx")
    assert ops["DequantizeLinear"] == 1 and ops["MatMul"] == 1 and "QuantLinear" not in ops
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    weight = next(t for t in model.graph.initializer if t.name == dq.input[0])
    assert weight.data_type == (onnx.TensorProto.INT8 if scheme == "int8" else onnx.TensorProto.INT4)
    assert list(weight.dims) == [k, 11]
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs.get("block_size", 0) == group and attrs["axis"] == (0 if group else 1)
    assert any("session.qdq_matmulnbits_accuracy_level=0" in n for n in report.notes)


@pytest.mark.parametrize("k, level", [(64, 0), (37, 0), (64, 4)])
def test_int4_exports_as_matmulnbits(tmp_path, k, level):
    layer = _layer(k, scheme="int4", group_size=16)
    x = torch.randn(3, k)
    atol = 1e-5 if level == 0 else 0.05  # level 4 rounds the activations to int8 inside the kernel
    report = go.export_onnx(layer, x, tmp_path / "q.onnx", quant_format="matmulnbits", accuracy_level=level,
                            atol=atol)
    model, ops = _ops(tmp_path / "q.onnx")
    assert report.verified and ops == {"MatMulNBits": 1, "Add": 1}
    node = model.graph.node[0]
    assert {a.name: a.i for a in node.attribute} == {"K": k, "N": 11, "bits": 4, "block_size": 16,
                                                     "accuracy_level": level}


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 0), ("int4", 24)])
def test_matmulnbits_refuses_what_it_cannot_run(tmp_path, scheme, group):
    with pytest.raises(QuantLoweringError, match="quant_format='qdq'"):
        go.export_onnx(_layer(48, scheme=scheme, group_size=group), torch.randn(2, 48), tmp_path / "q.onnx",
                       quant_format="matmulnbits")
    assert not (tmp_path / "q.onnx").exists()


def test_w8a8_exports_as_integer_ops_and_matches_elementwise(tmp_path):
    layer = _layer(40, scheme="int8", group_size=0, activations="per_tensor")
    report = go.export_onnx(layer, torch.randn(2, 6, 40) * 2, tmp_path / "q.onnx")
    _, ops = _ops(tmp_path / "q.onnx")
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulInteger"] == 1 and "DequantizeLinear" not in ops
    assert all(run.max_abs_error < 1e-4 for run in report.runs)  # one layer: the same codes, exactly


class _SharedInput(nn.Module):
    """q, k, v read one tensor with one SmoothQuant factor: one Mul and one quantization in ONNX."""

    def __init__(self, k=16, activations="per_tensor"):
        super().__init__()
        torch.manual_seed(2)
        smooth = torch.rand(k) + 0.5
        self.q, self.k, self.v = (QuantLinear.from_linear(nn.Linear(k, 8).weight, None, scheme="int8",
                                                          group_size=0, activations=activations, smooth=smooth)
                                  for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) * self.v(x)


@pytest.mark.parametrize("activations, quantizer", [("per_tensor", "DynamicQuantizeLinear"),
                                                     ("per_token", "QuantizeLinear")])
@pytest.mark.parametrize("k", [16, 1536])  # the exporter itself merges equal constants up to 1024 elements only
def test_layers_reading_one_tensor_share_its_scaling_and_quantization(tmp_path, k, activations, quantizer):
    go.export_onnx(_SharedInput(k, activations), torch.randn(4, k), tmp_path / "q.onnx")
    _, ops = _ops(tmp_path / "q.onnx")
    assert ops[quantizer] == 1 and ops["MatMulInteger"] == 3
    assert ops["Mul"] == 1 + 2 * 3 + 1  # the shared smoothing, two scale Muls per layer, k * v


def test_quantized_layers_are_lowered_in_memory_and_the_file_written_once(tmp_path, monkeypatch):
    """The lowering edits the exporter's in-memory graph: one write, already lowered (the file was once
    saved with the markers, reloaded, edited and saved again)."""
    writes = []
    save = onnx.save_model

    def spy(proto, path, *args, **kwargs):
        graph = proto.graph
        used = {i for n in graph.node for i in n.input}
        writes.append((collections.Counter(n.op_type for n in graph.node), {o.domain for o in proto.opset_import},
                       [t.name for t in graph.initializer if t.name not in used]))
        return save(proto, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save", spy)
    monkeypatch.setattr(onnx, "save_model", spy)
    report = go.export_onnx(_layer(scheme="int4", group_size=16, k=64), torch.randn(2, 64), tmp_path / "m.onnx")
    assert report.verified and len(writes) == 1
    ops, domains, unused = writes[0]
    assert ops == {"DequantizeLinear": 1, "MatMul": 1, "Add": 1} and domains == {""} and unused == []


class _Lookup(nn.Module):
    def __init__(self, scheme, group):
        super().__init__()
        from graphopt.nn.quant import QuantEmbedding

        torch.manual_seed(0)
        self.table = QuantEmbedding.from_embedding(nn.Embedding(40, 24), scheme=scheme, group_size=group)

    def forward(self, ids):
        return self.table(ids)


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 8)])
def test_packed_embedding_lookups_run_in_onnxruntime(tmp_path, scheme, group):
    import onnxruntime as ort

    model, ids = _Lookup(scheme, group), torch.randint(0, 40, (2, 9))
    go.export_onnx(model, ids, tmp_path / "e.onnx")
    _, ops = _ops(tmp_path / "e.onnx")
    if scheme == "int8":  # one scale per row: two gathers, a cast and a product, nothing else
        assert ops == collections.Counter({"Gather": 2, "Cast": 1, "Mul": 1})
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), model(ids), atol=1e-6)


def _calib(n=4):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("name", ["llama_causal_lm", "gpt2_lm_head"])
@pytest.mark.parametrize("pipeline, fmt", [("quantize(scheme=int4,group_size=16,method=gptq)", "qdq"),
                                           ("quantize(scheme=int4,group_size=16)", "matmulnbits"),
                                           ("quantize(scheme=w8a8)", "qdq")])
def test_hf_causal_lms_quantize_and_run_in_onnxruntime(tmp_path, name, pipeline, fmt):
    model, inputs = hf_model(name)  # default config: KV cache on
    res = go.optimize(model, inputs, pipeline, calib=_calib(), measure=False, on_error="raise")
    assert res.report.records[-1].status == "ok"
    report = res.export_onnx(tmp_path / "q.onnx", quant_format=fmt)
    assert report.verified
    _, ops = _ops(tmp_path / "q.onnx")
    wanted = {"qdq": "DequantizeLinear", "matmulnbits": "MatMulNBits"}[fmt] if "w8a8" not in pipeline \
        else "MatMulInteger"
    assert ops[wanted] == sum(isinstance(m, QuantLinear) for m in res.model.modules())


@pytest.mark.parametrize("options, match", [({"quant_format": "nbits"}, "quant_format='nbits'"),
                                            ({"accuracy_level": 7}, "accuracy_level=7"),
                                            ({"opset": "23"}, "opset='23'")])
def test_bad_export_options_are_refused_before_anything_is_written(tmp_path, monkeypatch, options, match):
    """A bad quant_format once left an unlowered file that onnxruntime refused, after the whole export."""
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported before checking options"))
    with pytest.raises(ValueError, match=match):
        go.export_onnx(_layer(scheme="int4", group_size=16, k=64), torch.randn(2, 64), tmp_path / "m.onnx", **options)
    assert list(tmp_path.iterdir()) == []


def test_an_opset_raised_for_quantized_layers_is_said(tmp_path):
    report = go.export_onnx(_layer(scheme="int4", group_size=16, k=64), torch.randn(2, 64), tmp_path / "m.onnx",
                            opset=18)
    assert report.opset == 21 and report.verified
    assert any("not the 18 asked for" in n for n in report.notes)


def test_a_verification_crash_leaves_no_unverified_file(tmp_path, monkeypatch):
    import graphopt.emit.onnx_export as onnx_export

    def crash(*args, **kwargs):
        raise MemoryError("onnxruntime ran out of memory")

    monkeypatch.setattr(onnx_export, "verify_file", crash)
    with pytest.raises(go.OnnxVerificationError, match="crashed: MemoryError") as failed:
        go.export_onnx(_layer(scheme="int8", group_size=0), torch.randn(2, 37), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and failed.value.failed_path.exists()


def test_a_weight_only_qdq_file_reports_what_a_plain_session_computes(tmp_path):
    """A plain InferenceSession (what users run) fuses QDQ at accuracy level 4: an int4 MiniLM's hidden state
    once differed from torch by 0.75 there, unreported; the report now gives that figure beside the verified one."""
    ort = pytest.importorskip("onnxruntime")
    layer = _layer(scheme="int4", group_size=16, k=64)
    x = torch.randn(8, 64) * 4
    report = go.export_onnx(layer, x, tmp_path / "m.onnx")
    assert report.verified and report.plain_session_error is not None
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = layer(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert report.plain_session_error == pytest.approx(float((got - want).abs().max()), rel=1e-6)
    assert report.plain_session_error > report.max_abs_error
    assert any("plain onnxruntime.InferenceSession" in n for n in report.notes)
    weight_only_int8 = go.export_onnx(_layer(scheme="int8", group_size=0), torch.randn(2, 37), tmp_path / "w8.onnx")
    assert weight_only_int8.plain_session_error is not None  # every weight-only QDQ file gets the figure


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 32), ("ternary", 0)])
def test_quantized_convolutions_keep_packed_weights_in_onnx(tmp_path, scheme, group):
    """The codes stay int8 / int4 in the file, as Cast * scale ops (not DequantizeLinear, which onnxruntime
    would run on every call instead of folding it into the float weights at load)."""
    from graphopt.nn.quant import QuantConv2d

    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d.from_conv(nn.Conv2d(16, 24, 3, 2, 1), scheme=scheme, group_size=group),
                          nn.ReLU(), QuantConv2d.from_conv(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
                                                           scheme=scheme, group_size=0))
    report = go.export_onnx(model, torch.randn(2, 16, 12, 12), tmp_path / "c.onnx", atol=1e-5)
    onnx_model, ops = _ops(tmp_path / "c.onnx")
    assert report.verified and ops["Cast"] == 2 and ops["Conv"] == 2
    assert "DequantizePacked" not in ops and "DequantizeLinear" not in ops
    assert ops["Slice"] == (1 if group else 0)  # rows of 16 x 9 = 144: 5 groups of 32, padded, then sliced
    init = {t.name: t for t in onnx_model.graph.initializer}
    codes = [init[n.input[0]] for n in onnx_model.graph.node if n.op_type == "Cast" and n.input[0] in init]
    assert [list(t.dims) for t in codes] == [[24, 5 if group else 1, 32 if group else 144], [24, 1, 9]]
    assert {t.data_type for t in codes} == {onnx.TensorProto.INT8 if scheme == "int8" else onnx.TensorProto.INT4}
    largest_float = max(int(np.prod(t.dims)) for t in init.values() if t.data_type == onnx.TensorProto.FLOAT)
    assert largest_float <= 24 * 9  # scales and a bias: no float weights
