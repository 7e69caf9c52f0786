"""Capture: turn a module + example inputs into a Program whose graph is an analysis.

``torch.export.export(strict=False)`` is the main path (aten graph, parameter FQNs in the graph
signature, ``nn_module_stack`` on every node, FakeTensor values in ``node.meta["val"]``); it works
with weights on the ``meta`` device. ``torch.fx.symbolic_trace`` is the graph-mode path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .analysis import AnalysisManager, register_analysis
from .inputs import ExampleInputs, as_example_inputs
from .program import Program

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the failing module/op and what to try."""


def _module_stack_hooks(model: nn.Module) -> tuple[list[str], list[Any]]:
    """Hooks that keep the stack of modules currently executing (names), for error messages."""
    stack: list[str] = []
    names = {id(m): (n or type(m).__name__) for n, m in model.named_modules()}
    handles = []
    for m in model.modules():
        name = f"{names[id(m)]} ({type(m).__name__})"
        handles.append(m.register_forward_pre_hook(lambda mod, args, _n=name: stack.append(_n)))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, _n=name: stack.pop() if stack and stack[-1] == _n else None))
    return stack, handles


def export_program(module: nn.Module, inputs: ExampleInputs) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` with an error that names the module that failed."""
    try:
        with torch.no_grad():
            return torch.export.export(module, inputs.args, inputs.kwargs, strict=False)
    except Exception as first:
        stack, handles = _module_stack_hooks(module)
        try:
            with torch.no_grad():
                torch.export.export(module, inputs.args, inputs.kwargs, strict=False)
        except Exception:
            pass
        finally:
            for h in handles:
                h.remove()
        where = f" inside {' > '.join(stack[-3:])}" if stack else ""
        first_line = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}{where}: {type(first).__name__}: "
            f"{first_line}\n  try: check the example inputs ({inputs.describe()}) run the model eagerly; "
            f"replace data-dependent Python control flow in that module with torch.cond or tensor ops; "
            f"or run only module-level passes (they do not need a graph)"
        ) from first


@register_analysis("exported")
def _exported(program: Program, am: AnalysisManager) -> torch.export.ExportedProgram:
    return export_program(program.module, program.example_inputs)


@register_analysis("fx_graph")
def _fx_graph(program: Program, am: AnalysisManager) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(program.module)
    except Exception as e:
        raise CaptureError(
            f"torch.fx.symbolic_trace could not trace {type(program.module).__name__}: {type(e).__name__}: {e}\n"
            f"  try: the 'exported' analysis (torch.export), which handles HuggingFace models") from e


def capture(model: nn.Module, example_inputs: Any, *, calib: Any = None) -> Program:
    """Capture ``model`` on ``example_inputs``; the exported graph is computed now and cached.

    The model is not copied (capture never changes it; ``optimize`` works on a copy).
    """
    program = Program(model, as_example_inputs(example_inputs), calib=calib)
    start = time.perf_counter()
    program.analyses.get("exported")
    log.info("captured %s in %.2fs", type(model).__name__, time.perf_counter() - start)
    return program
