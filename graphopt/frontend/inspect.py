"""Readable summaries of a captured Program (used by ``graphopt inspect``).

:func:`summarize` shows the graph size, parameters and buffers, inputs and outputs with shapes,
the top of the module tree with parameter counts, and op counts by aten target.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from ..units import format_bytes
from .nodes import node_value_info, tied_parameters


def op_counts(exported: ExportedProgram | fx.GraphModule) -> Counter[str]:
    """How many ``call_function``/``call_module``/``call_method`` nodes there are per target."""
    counts: Counter[str] = Counter()
    for node in exported.graph.nodes:
        if node.op in ("call_function", "call_method"):
            counts[str(node.target) if isinstance(node.target, torch._ops.OpOverload)
                   else getattr(node.target, "__name__", str(node.target))] += 1
        elif node.op == "call_module":
            counts[f"module:{node.target}"] += 1
    return counts


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def _tensors_line(label: str, tensors: list[torch.Tensor]) -> str:
    if not tensors:
        return f"{label}: none"
    numel = sum(t.numel() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
    devices = ", ".join(sorted({t.device.type for t in tensors}))
    return f"{label}: {numel:,} ({_human(numel)}) in {len(tensors)} tensors, {format_bytes(size)} {dtypes} on {devices}"


def _fmt_value(shape: tuple | None, dtype: str | None) -> str:
    if shape is None:
        return "(not a tensor)"
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"


def _leaf_paths(spec: Any, prefix: str = "") -> list[str]:
    """Names of the leaves of a pytree spec, e.g. ``last_hidden_state`` or ``[0]``."""
    if spec.is_leaf():
        return [prefix or "output"]
    keys = spec.context if isinstance(spec.context, (list, tuple)) else range(spec.num_children)
    if len(keys) != spec.num_children:
        keys = range(spec.num_children)
    paths: list[str] = []
    for key, child in zip(keys, spec.children(), strict=True):
        name = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))
        paths += _leaf_paths(child, name)
    return paths


def _io_lines(exported: ExportedProgram) -> list[str]:
    nodes = {n.name: n for n in exported.graph.nodes}
    sig = exported.graph_signature
    lines = ["inputs:"]
    for name in sig.user_inputs:
        lines.append(f"  {name:<28} {_fmt_value(*node_value_info(nodes[name]))}")
    lines.append("outputs:")
    try:
        paths = _leaf_paths(exported.call_spec.out_spec)
    except Exception:  # noqa: BLE001 - an unusual output spec only costs the names
        paths = []
    outs = list(sig.user_outputs)
    if len(paths) != len(outs):
        paths = [f"output[{i}]" for i in range(len(outs))]
    for path, name in zip(paths, outs, strict=True):
        value = _fmt_value(*node_value_info(nodes[name])) if name in nodes else "(constant)"
        lines.append(f"  {path:<28} {value}")
    return lines


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _module_rows(module: nn.Module, prefix: str, depth: int, max_depth: int) -> list[tuple[str, str, str]]:
    """``(indented name, type, params)`` rows; runs of same-typed, same-sized children collapse to one."""
    rows: list[tuple[str, str, str]] = []
    children = list(module.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        j = i + 1
        while (j < len(children) and type(children[j][1]) is type(child)
               and _param_count(children[j][1]) == _param_count(child)):
            j += 1
        full = f"{prefix}{name}"
        indent = "  " * depth
        if j - i > 1:  # e.g. layers.0-31: 32 identical decoder layers
            last = children[j - 1][0]
            rows.append((f"{indent}{full}..{last}", f"{j - i} x {type(child).__name__}",
                         f"{j - i} x {_param_count(child):,}"))
        else:
            rows.append((f"{indent}{full}", type(child).__name__, f"{_param_count(child):,}"))
        if depth < max_depth:
            rows += _module_rows(child, f"{full}.", depth + 1, max_depth)
        i = j
    return rows


def module_tree(module: nn.Module, max_depth: int = 2) -> list[str]:
    """The top ``max_depth`` levels of the module tree with parameter counts, as text lines."""
    rows = [("(root)", type(module).__name__, f"{_param_count(module):,}")]
    if max_depth > 0:
        rows += _module_rows(module, "", 1, max_depth)
    width = [max(len(r[k]) for r in rows) for k in range(3)]
    return [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]


def summarize(program: Any, *, max_depth: int = 2, max_ops: int | None = None) -> str:
    """A readable summary of a Program's captured graph and module tree (computes the capture if needed)."""
    exported: ExportedProgram = program.analyses.get("exported")
    model = program.module
    nodes = list(exported.graph.nodes)
    kinds = Counter(n.op for n in nodes)
    sig = exported.graph_signature
    n_state = len(sig.inputs_to_parameters) + len(sig.inputs_to_buffers) + len(sig.inputs_to_lifted_tensor_constants)
    lines = [
        f"{type(model).__name__}: {len(nodes)} graph nodes (torch.export): {kinds['call_function']} ops, "
        f"{n_state} parameter/buffer inputs, {len(sig.user_inputs)} user input(s), {len(sig.user_outputs)} output(s)",
        _tensors_line("parameters", list(model.parameters())),
        _tensors_line("buffers", list(model.buffers())),
    ]
    for group in tied_parameters(model):
        lines.append(f"tied: {' = '.join(group)}")
    lines += _io_lines(exported)
    lines.append(f"modules (top {max_depth} levels):")
    lines += module_tree(model, max_depth)
    counts = op_counts(exported)
    shown = counts.most_common(max_ops)
    lines.append(f"ops by target ({len(counts)} distinct):")
    width = max((len(t) for t, _ in shown), default=0)
    lines += [f"  {target:<{width}}  {count:>5}" for target, count in shown]
    if len(shown) < len(counts):
        lines.append(f"  ... {len(counts) - len(shown)} more targets")
    return "\n".join(lines)
