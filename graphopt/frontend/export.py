"""Capture: the graph of a module run on example inputs.

``torch.export.export(strict=False)`` is the main path (aten graph, parameter FQNs in the graph
signature, ``nn_module_stack`` on every op node, FakeTensor values in ``node.meta["val"]``); it works
with weights on the ``meta`` device. ``torch.fx.symbolic_trace`` is the graph-mode path for models it
can trace. A model that cannot be captured raises :class:`~graphopt.frontend.errors.CaptureError` naming
the module and source line that failed, the cause, and what to try. Capture never changes the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from .errors import diagnose, first_line, stderr_without_partial_graph
from .inputs import ExampleInputs, as_example_inputs
from .kv_cache import caches_off

log = logging.getLogger(__name__)


def export_program(module: nn.Module, inputs: Any) -> ExportedProgram:
    """``torch.export.export(strict=False)`` under no_grad; failures raise :class:`CaptureError`."""
    inputs = as_example_inputs(inputs)
    with stderr_without_partial_graph() as drop:
        try:
            with torch.no_grad(), caches_off(module):
                return torch.export.export(module, inputs.args, inputs.kwargs, strict=False)
        except Exception as e:
            err = diagnose(e, module, inputs, "torch.export")
            if err.partial_graph:
                drop.append(err.partial_graph)
                log.debug("partial graph at the failure:\n%s", err.partial_graph)
            raise err from e


def _placeholder_values(gm: fx.GraphModule, inputs: ExampleInputs) -> list[Any] | None:
    values: list[Any] = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if str(node.target).startswith("*"):
            return None
        if i < len(inputs.args):
            values.append(inputs.args[i])
        elif node.target in inputs.kwargs:
            values.append(inputs.kwargs[node.target])
        elif node.args:  # the forward() default, stored by symbolic_trace
            values.append(node.args[0])
        else:
            return None
    return values


def trace_fx(module: nn.Module, inputs: Any = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` (the GraphModule shares the module's parameters), with shapes.

    With ``inputs``, shapes are propagated on fake tensors into ``node.meta["tensor_meta"]`` (a best
    effort: a failure there is logged, not raised). Failures to trace raise :class:`CaptureError`.
    """
    ex = as_example_inputs(inputs) if inputs is not None else None
    with stderr_without_partial_graph():
        try:
            gm = fx.symbolic_trace(module)
        except Exception as e:
            raise diagnose(e, module, ex, "torch.fx.symbolic_trace") from e
    if ex is not None:
        _propagate_shapes(gm, ex, module)
    return gm


def _propagate_shapes(gm: fx.GraphModule, inputs: ExampleInputs, module: nn.Module) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    values = _placeholder_values(gm, inputs.to(device))  # only shapes matter: follow the weights' device
    if values is None:
        return
    printed = io.StringIO()
    try:  # on fake tensors: no compute, and train-mode BatchNorm statistics stay untouched
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
    except Exception as e:  # noqa: BLE001 - shapes are an extra; the trace itself succeeded
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        log.warning("fx shape propagation failed on %s (no shapes on the fx graph): %s",
                    type(module).__name__, first_line(e))
        log.debug("%s", printed.getvalue())
