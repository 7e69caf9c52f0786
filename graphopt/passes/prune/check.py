"""After a prune, the model must trace to the same graph with smaller sizes.

Pruning changes widths only. If the re-captured graph has other ops, in another order, or other
scalar operands of arithmetic, then Python code read a size and did something else with it: a branch
on ``x.shape[-1]`` took the other path, or an attribute that was rewritten as a size is also used as
a value (``h * self.width``, a ``1 / sqrt(self.head_dim)`` scale). Such a model runs and is wrong, so
:func:`graph_difference` names the first place where the two graphs part, with its source line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from graphopt.frontend.export import export_program
from graphopt.frontend.nodes import node_module_path
from graphopt.infra.program import Program


def _key(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket._qualified_op_name
    return getattr(target, "__name__", str(target))


def _is_arithmetic(target: Any) -> bool:
    """Elementwise ops: their integer operands are values; elsewhere integers are sizes, dims or indices."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _source_line(node: Node) -> str:
    """The user's line that produced ``node`` (the innermost frame outside torch), or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.splitlines()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i, ln in enumerate(lines)
              if ln.startswith("File ")]
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return ""
    where, code = user[-1]
    return f"{where.removeprefix('File ')}: {code}" if code and not code.startswith("File ") else where


def _scalars_differ(a: Any, b: Any, ints_are_sizes: bool) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return isinstance(a, Node) != isinstance(b, Node)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_scalars_differ(x, y, ints_are_sizes) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is not b
    if isinstance(a, int) and isinstance(b, int):
        return not ints_are_sizes and a != b
    if isinstance(a, float) and isinstance(b, float):
        return not (a == b or (math.isnan(a) and math.isnan(b)))
    return type(a) is not type(b) or (isinstance(a, (str, torch.dtype, torch.device)) and a != b)


#: ops that vanish when they would be no-ops (``contiguous()`` of a contiguous tensor, ``to()`` of the
#: same dtype): a smaller size can make them so, which changes nothing the model computes
_LAYOUT_ONLY = {"aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to", "aten::alias", "aten::detach"}
_IGNORED = {"aten::_assert_tensor_metadata", "aten::_assert_scalar"}


def _ops(ep: torch.export.ExportedProgram) -> list[Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function" and _key(n.target) not in _IGNORED | _LAYOUT_ONLY]


def _through_layout(node: Any) -> Any:
    """The value a layout-only op passes on (its input), followed through chains of them."""
    while isinstance(node, Node) and node.op == "call_function" and _key(node.target) in _LAYOUT_ONLY \
            and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def graph_difference(before: torch.export.ExportedProgram, after: torch.export.ExportedProgram) -> str:
    """'' if ``after`` is ``before`` with other sizes; else where and how they differ."""
    a_ops, b_ops = _ops(before), _ops(after)
    index = {n: i for i, n in enumerate(a_ops)} | {n: i for i, n in enumerate(b_ops)}
    for i, (x, y) in enumerate(zip(a_ops, b_ops)):
        how = ""
        if _key(x.target) != _key(y.target):
            how = f"{_key(x.target)} became {_key(y.target)}"
        elif _scalars_differ(list(x.args) + sorted(x.kwargs.items()), list(y.args) + sorted(y.kwargs.items()),
                             not _is_arithmetic(x.target)):
            how = f"its operands changed from {_operands(x)} to {_operands(y)}"
        elif [index.get(_through_layout(a)) for a in x.all_input_nodes] != [
                index.get(_through_layout(a)) for a in y.all_input_nodes]:
            how = "it reads other values"
        if how:
            return _describe(x, i, how)
    if len(a_ops) != len(b_ops):
        longer = a_ops if len(a_ops) > len(b_ops) else b_ops
        node = longer[min(len(a_ops), len(b_ops))]
        return _describe(node, min(len(a_ops), len(b_ops)),
                         f"the graph has {len(b_ops)} ops instead of {len(a_ops)}")
    return ""


def _operands(node: Node) -> str:
    return repr([a for a in node.args if not isinstance(a, Node)])[:80]


def _describe(node: Node, i: int, how: str) -> str:
    module = node_module_path(node) or "<root>"
    line = _source_line(node)
    return f"op {i} ({_key(node.target)} in {module}{', ' + line if line else ''}): {how}"


def structure_error(program: Program, before: torch.export.ExportedProgram) -> str:
    """'' if the program still traces to ``before``'s graph; else what changed (or why capture failed)."""
    try:
        after = export_program(program.module, program.example_inputs)
    except Exception as e:  # a model that no longer captures is a changed model
        return f"the pruned model no longer captures ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return graph_difference(before, after)
