"""Write residual ``Add -> LayerNormalization`` pairs so that onnxruntime's CPU provider runs them unfused.

onnxruntime fuses an ``Add`` of two 3-D tensors of one shape feeding a ``LayerNormalization`` into its
``com.microsoft.SkipLayerNormalization`` (``SkipLayerNormFusion``, at the default optimisation level). On
its CPU provider, versions 1.31-1.32, that kernel runs 5-6x slower than the pair it replaces
([32, 64, 384] float: 1.66 ms against 0.28 ms on 2 threads of an AMD EPYC), and in a BERT-style encoder it
is 15% of the fp32 model's time and 30% of a w8a8 one's (all-MiniLM-L6-v2 at batch 32 x 64 tokens;
benchmarks/README, ``search.py``).

:func:`flatten_residual_norms` keeps the fusion from matching without changing what is computed: both
operands of the ``Add`` are viewed as ``[rows, hidden]`` (``Reshape``, which onnxruntime runs without a
copy), the ``Add`` and the ``LayerNormalization`` (over the last axis, as before) run on the view, and the
result is viewed back to the input's shape. The fusion only matches 3-D operands, so the pair then runs on
onnxruntime's own ``Add`` and ``LayerNormalization`` kernels: the same arithmetic, element for element.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

log = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")


def _same_3d_shape(a: ir.Value, b: ir.Value) -> int | None:
    """The last dimension when ``a`` and ``b`` are 3-D of one shape (what the fusion matches), else None."""
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return None
    if any(x != y for x, y in zip(a.shape, b.shape)):
        return None
    hidden = a.shape[2]
    return hidden if isinstance(hidden, int) else None


def _residual_pair(norm: ir.Node) -> tuple[ir.Node, int] | None:
    """The ``Add`` feeding ``norm`` and the width when onnxruntime would fuse the two; None otherwise."""
    if norm.op_type != "LayerNormalization" or norm.domain not in _ONNX_DOMAINS:
        return None
    add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or add.graph is not norm.graph:
        return None
    summed = norm.inputs[0]
    if len(summed.uses()) != 1 or summed.is_graph_output():
        return None
    axis = norm.attributes.get_int("axis", -1)
    if axis not in (-1, 2):
        return None
    if any(out.uses() or out.is_graph_output() for out in norm.outputs[1:]):  # mean / inv_std read: leave it
        return None
    hidden = _same_3d_shape(add.inputs[0], add.inputs[1])
    return None if hidden is None else (add, hidden)


def flatten_residual_norms(model: ir.Model) -> int:
    """Rewrite every residual ``Add -> LayerNormalization`` of ``model``'s main graph (in place) on a 2-D view.

    Returns how many pairs were rewritten. Pairs whose operands are not 3-D of one shape, whose sum is read
    elsewhere, whose normalisation is not over the last axis or whose statistics outputs are read are left
    as they are (onnxruntime does not fuse those either).
    """
    import onnx_ir as ir

    graph = model.graph
    pairs = [(norm, *found) for norm in list(graph) if (found := _residual_pair(norm)) is not None]
    for i, (norm, add, hidden) in enumerate(pairs):
        prefix = f"graphopt_ln2d.{i}"
        rows_shape = ir.Value(name=f"{prefix}.rows_shape", const_value=ir.tensor(np.array([-1, hidden], np.int64)))
        graph.register_initializer(rows_shape)
        x, r = add.inputs
        shape = ir.node("Shape", [x], name=f"{prefix}.shape")
        views = [ir.node("Reshape", [v, rows_shape], name=f"{prefix}.view{j}") for j, v in enumerate((x, r))]
        graph.insert_before(add, [shape, *views])
        for j, view in enumerate(views):
            view.outputs[0].name = f"{prefix}.view{j}"
            view.outputs[0].shape = ir.Shape([None, hidden])
            view.outputs[0].dtype = x.dtype
            add.replace_input_with(j, view.outputs[0])
        flat = norm.outputs[0]
        add.outputs[0].shape = ir.Shape([None, hidden])
        back = ir.node("Reshape", [flat, shape.outputs[0]], name=f"{prefix}.back")
        graph.insert_after(norm, [back])
        out = back.outputs[0]
        out.shape, out.dtype = flat.shape, flat.dtype
        for user, index in list(flat.uses()):
            if user is not back:
                user.replace_input_with(index, out)
        for k, value in enumerate(graph.outputs):
            if value is flat:
                graph.outputs[k] = out
        name, flat.name = flat.name, f"{prefix}.flat"
        out.name = name
        flat.shape = ir.Shape([None, hidden])
    if pairs:
        log.info("wrote %d residual Add -> LayerNormalization pairs on 2-D views (onnxruntime's CPU provider "
                 "runs them unfused: its SkipLayerNormalization kernel is slower)", len(pairs))
    return len(pairs)


__all__ = ["flatten_residual_norms"]
