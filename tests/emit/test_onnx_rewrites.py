"""export_onnx's rewrites for onnxruntime: residual norms on 2-D views (run unfused), attention without transposes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model


def _optimized_ops(path: os.PathLike, tmp_path, disabled: tuple[str, ...] = ()) -> tuple[list[str], ort.InferenceSession]:
    """The op types onnxruntime's CPU provider runs after its default graph optimisations, and the session."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled))
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node], session


def _feed(session: ort.InferenceSession, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v.numpy() for k, v in tensors.items() if k in wanted}


def test_bert_runs_its_residual_norms_unfused_with_the_same_arithmetic(tmp_path):
    model, tensors = hf_model("bert", layers=3)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    report = go.export_onnx(model, tensors, tmp_path / "flat.onnx", dynamic_axes=axes)
    traced = go.export_onnx(model, tensors, tmp_path / "traced.onnx", dynamic_axes=axes, ort_rewrites=False)

    # two residual norms per block (after attention, after the MLP); the embeddings' norm adds a broadcast
    assert any("6 residual Add -> LayerNormalization pairs on 2-D views, 3 Attention nodes on the [batch, seq, "
               "hidden] layout" in n for n in report.notes), report.notes
    assert not any("onnxruntime's CPU provider" in n for n in traced.notes)
    written = onnx.load(str(report.path)).graph.node
    assert "Transpose" not in [n.op_type for n in written]  # the per-head transposes around each Attention
    heads = [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")} for n in written
             if n.op_type == "Attention"]
    assert heads == [{"q_num_heads": model.config.num_attention_heads,
                      "kv_num_heads": model.config.num_attention_heads}] * 3
    flat_ops, flat_session = _optimized_ops(report.path, tmp_path)
    traced_ops, _ = _optimized_ops(traced.path, tmp_path)
    assert traced_ops.count("SkipLayerNormalization") == 6  # what onnxruntime does to the traced pairs
    assert "SkipLayerNormalization" not in flat_ops and flat_ops.count("LayerNormalization") == 7

    # the same kernels on views: equal, bit for bit, to the traced graph with the fusion turned off
    _, unfused = _optimized_ops(traced.path, tmp_path, disabled=("SkipLayerNormFusion",))
    grown = {k: v.repeat(3, 2) for k, v in tensors.items()}  # other sizes on both dynamic axes
    grown["attention_mask"][1, -3:] = 0  # padding: the mask reaches the rewritten Attention
    for got, want in zip(flat_session.run(None, _feed(flat_session, grown)), unfused.run(None, _feed(unfused, grown))):
        assert got.shape == want.shape and np.array_equal(got, want)
    with torch.no_grad():
        ref = model(**grown).last_hidden_state.numpy()
    np.testing.assert_allclose(flat_session.run(None, _feed(flat_session, grown))[0], ref, atol=1e-4, rtol=1e-3)


class _Residuals(nn.Module):
    """Residual norms the rewrite must leave: the sum read twice, a broadcast operand, two normalised axes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.read_twice = nn.LayerNorm(width)
        self.broadcast = nn.LayerNorm(width)
        self.two_axes = nn.LayerNorm((5, width))
        self.plain = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.proj(x) + x
        a = self.read_twice(s) + s  # the sum is read again: onnxruntime fuses nothing here either
        b = self.broadcast(a + self.bias)
        c = self.two_axes(self.proj(b) + b)
        return self.plain(self.proj(c) + c), a  # the last pair is a graph output


def test_only_the_pairs_onnxruntime_would_fuse_are_rewritten(tmp_path):
    torch.manual_seed(0)
    model = _Residuals().eval()
    x = torch.randn(2, 5, 16)
    report = go.export_onnx(model, (x,), tmp_path / "m.onnx", dynamic_axes={"x": {0: "batch"}})
    assert any(n.endswith(": 1 residual Add -> LayerNormalization pairs on 2-D views") for n in report.notes), \
        report.notes
    graph = onnx.load(str(report.path)).graph
    assert sum(n.op_type == "Reshape" for n in graph.node) == 3  # two views in, one back
    traced = go.export_onnx(model, (x,), tmp_path / "t.onnx", dynamic_axes={"x": {0: "batch"}}, ort_rewrites=False)
    assert [o.name for o in graph.output] == [o.name for o in onnx.load(str(traced.path)).graph.output]
    ops, session = _optimized_ops(report.path, tmp_path)
    assert "SkipLayerNormalization" not in ops
    with torch.no_grad():
        want = model(x.repeat(3, 1, 1))
    got = session.run(None, {"x": x.repeat(3, 1, 1).numpy()})
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "pairs"), [("gpt2", 1), ("llama", 0)])
def test_pre_norm_models_rewrite_only_their_final_norm(name, pairs, tmp_path):
    """Pre-norm blocks read each residual sum twice (norm and next sum): only GPT-2's final ``ln_f`` pairs with
    one Add; Llama's RMSNorm is no LayerNormalization."""
    model, tensors = hf_model(name)
    flat = go.export_onnx(model, tensors, tmp_path / "flat.onnx")
    traced = go.export_onnx(model, tensors, tmp_path / "traced.onnx", ort_rewrites=False)
    assert sum(f"{pairs} residual Add" in n for n in flat.notes) == (pairs > 0)
    assert not any("Attention nodes" in n for n in flat.notes)  # GPT-2 merges the heads' output straight into
    # [batch * seq, hidden] rows for its Conv1D (not 3-D); Llama rotates q and k after the head split
    assert _optimized_ops(traced.path, tmp_path)[0].count("SkipLayerNormalization") == pairs
    assert _optimized_ops(flat.path, tmp_path)[0].count("SkipLayerNormalization") == 0
    flat_nodes = [n.op_type for n in onnx.load(str(flat.path)).graph.node]
    traced_nodes = [n.op_type for n in onnx.load(str(traced.path)).graph.node]
    assert len(flat_nodes) - len(traced_nodes) == 4 * pairs  # Shape and three Reshapes per pair
    assert flat_nodes.count("Attention") == traced_nodes.count("Attention") == model.config.num_hidden_layers


@pytest.mark.parametrize(("dims", "rewritten"), [(["b", "s"], 1), ([None, None], 0), ([2, 3], 1), ([2, None], 0)])
def test_operands_of_unknown_size_may_broadcast_and_are_left_alone(dims, rewritten):
    """Two unknown dimensions may differ at run time ([2, 3, 16] + [2, 1, 16]): on 2-D views the rows would
    not line up, so only operands whose sizes are known equal (numbers, or one named symbol) are rewritten."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from graphopt.emit.onnx_rewrites import flatten_residual_norms

    shape = [*dims, 16]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("LayerNormalization", ["s", "g"], ["out"])],
        "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        [helper.make_tensor("g", TensorProto.FLOAT, [16], [1.0] * 16)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert flatten_residual_norms(model) == rewritten
    assert [n.op_type for n in model.graph].count("Reshape") == 3 * rewritten
