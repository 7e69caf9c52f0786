"""graphopt::dyt: reference, custom op (CPU path, fake impl, autograd), Triton under the interpreter, ONNX."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.kernels.dyt import ONNX_TRANSLATIONS, dyt, dyt_backward_reference, dyt_reference
from graphopt.nn.dyt import DyT

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(c=12, per_channel=False, bias=True, dtype=torch.float32, shape=(3, 5)):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, c, generator=g) * 2).to(dtype)
    alpha = (torch.rand(c if per_channel else 1, generator=g) + 0.2).to(dtype)
    w = torch.randn(c, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    return x, alpha, w, b


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_the_formula(per_channel, bias):
    x, a, w, b = _args(per_channel=per_channel, bias=bias)
    expected = w * torch.tanh(a * x) + (b if b is not None else 0)
    assert torch.allclose(dyt(x, a, w, b), expected, atol=1e-6)
    assert torch.allclose(dyt_reference(x, a, w, b), expected, atol=1e-6)


def test_op_half_precision_computes_in_float32():
    x, a, w, b = _args(dtype=torch.float16)
    out = dyt(x, a, w, b)
    ref = (w.float() * torch.tanh(a.float() * x.float()) + b.float()).half()
    assert out.dtype == torch.float16 and torch.equal(out, ref)


def test_op_autograd_gradcheck_and_opcheck():
    x, a, w, b = (t.double().requires_grad_() for t in _args(c=5, shape=(2, 3)))
    assert torch.autograd.gradcheck(dyt, (x, a, w, b))
    assert torch.autograd.gradcheck(lambda x, a, w: dyt(x, a, w, None), (x, a, w))
    xp, ap, wp, _ = (t.double().requires_grad_() for t in _args(c=5, per_channel=True, shape=(2, 3)))
    assert torch.autograd.gradcheck(lambda x, a, w: dyt(x, a, w, None), (xp, ap, wp))
    torch.library.opcheck(torch.ops.graphopt.dyt.default, _args(c=5))


def test_op_rejects_mismatched_shapes():
    x, a, w, b = _args()
    with pytest.raises(ValueError, match="last dim"):
        dyt(x.transpose(1, 2), a, w, b)
    with pytest.raises(ValueError, match="alpha"):
        dyt(x, torch.ones(3), w, b)


_TRITON_SCRIPT = textwrap.dedent("""
    import json, torch
    from graphopt.kernels.dyt import (dyt_backward_reference, dyt_reference, dyt_triton_backward,
                                      dyt_triton_forward)
    out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for c, per_channel, bias in ((40, False, True), (7, True, False), (300, False, False)):
            x = (torch.randn(3, 7, c, generator=g) * 2).to(dtype)
            a = (torch.rand(c if per_channel else 1, generator=g) + 0.2).to(dtype)
            w = torch.randn(c, generator=g).to(dtype)
            b = torch.randn(c, generator=g).to(dtype) if bias else None
            gy = torch.randn(3, 7, c, generator=g).to(dtype)
            fwd = (dyt_triton_forward(x, a, w, b).float() - dyt_reference(x, a, w, b).float()).abs().max()
            got = dyt_triton_backward(gy, x, a, w, bias)
            ref = dyt_backward_reference(gy, x, a, w, bias)
            bwd = [float(((p.float() - q.float()).abs().max() / q.float().abs().max().clamp_min(1e-6)))
                   for p, q in zip(got, ref)]
            out.append({"dtype": str(dtype), "c": c, "fwd": float(fwd), "bwd": bwd,
                        "same_dtypes": [p.dtype == q.dtype for p, q in zip(got, ref)]})
    print(json.dumps(out))
""")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for r in results:
        tol = 1e-5 if r["dtype"] == "torch.float32" else 2e-3
        assert r["fwd"] <= tol * 10, r
        assert max(r["bwd"]) <= tol * 10, r
        assert all(r["same_dtypes"]), r


def test_fused_module_exports_and_matches_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "dyt(mode=init,fused=true)", measure=False, on_error="raise")
    fused = res.model
    assert all(m.fused for m in fused.modules() if isinstance(m, DyT))
    exported = torch.export.export(fused, (), dict(inputs), strict=False)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "graphopt.dyt.default" in targets
    path = tmp_path / "dyt.onnx"
    prog = torch.onnx.export(fused, (), kwargs=dict(inputs), dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)
    prog.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Tanh") == 5 + 1 and not any("dyt" in op for op in ops)  # 5 DyT + the BERT pooler
    sess = ort.InferenceSession(str(path))
    feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = fused(**inputs).last_hidden_state
    assert torch.allclose(torch.from_numpy(got), ref, atol=1e-4)


def test_backward_reference_matches_autograd():
    x, a, w, b = (t.double().requires_grad_() for t in _args(c=6))
    y = w * torch.tanh(a * x) + b
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, da, dw, db = dyt_backward_reference(gy, x.detach(), a.detach(), w.detach(), True)
    for got, ref in ((dx, x.grad), (da, a.grad), (dw, w.grad), (db, b.grad)):
        assert torch.allclose(got, ref)
