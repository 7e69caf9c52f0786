"""What every dimension rule uses: the rule registry, :class:`RuleContext`, and small helpers.

A rule relates the dims of an op's tensor inputs and outputs through a :class:`RuleContext`
(``unify``, ``layout``, ``freeze``, ``constant``). An op with no rule freezes every dim that flows
through it, and the dependency graph reports it: never a wrong cut.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node

from ...frontend.nodes import node_module_path as node_module
from ..diagnostics import Diagnostic
from ..dims import Space, SpaceTable

Rule = Callable[["RuleContext", Node], None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for aten op packets (``"aten::view"``) or python callables (``"getitem"``)."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def op_key(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket._qualified_op_name
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def is_pointwise(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def in_norm_layer(ctx: RuleContext, node: Node) -> bool:
    """True inside a module recognised as a LayerNorm/RMSNorm (by probing it, not by its name)."""
    return node_module(node) in ctx.norm_modules


def broadcast(ctx: RuleContext, out: list[Space], inputs: list[list[Space]], why: str) -> None:
    """Right-aligned broadcasting: equal non-1 dims are the same space; size-1 inputs broadcast."""
    for dims in inputs:
        for k in range(1, min(len(dims), len(out)) + 1):
            a, o = dims[-k], out[-k]
            if a.size == o.size and a.size != 1:
                ctx.unify(a, o, why)
            elif a.size != 1:
                ctx.freeze([a, o], f"{why}: cannot broadcast {a.size} to {o.size}")


class RuleContext:
    """What a dimension rule sees: the dims of nodes and the operations on spaces."""

    def __init__(self) -> None:
        self.table = SpaceTable()
        self._dims: dict[tuple[str, int | None], list[Space]] = {}
        self.constants: list[tuple[Node, Space]] = []
        self.heads: list[tuple[Node, Space]] = []
        self.diagnostics: list[Diagnostic] = []
        self.weights: set[str] = set()  # placeholder names of parameters and buffers
        self.norm_modules: set[str] = set()  # paths of modules recognised as LayerNorm / RMSNorm

    def is_multi(self, node: Node) -> bool:
        return isinstance(node.meta.get("val"), (list, tuple))

    def has_dims(self, node: Any) -> bool:
        return isinstance(node, Node) and isinstance(node.meta.get("val"), torch.Tensor)

    def dims(self, node: Node, index: int | None = None) -> list[Space]:
        key = (node.name, index)
        if key not in self._dims:
            val = node.meta.get("val")
            if index is not None:
                val = val[index]
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"{node.name} (index {index}) is not a tensor")
            self._dims[key] = [self.table.new(int(s)) for s in val.shape]
        return self._dims[key]

    def tensor_args(self, node: Node) -> list[Node]:
        out: list[Node] = []
        for a in list(node.args) + list(node.kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else [a]
            out += [x for x in items if self.has_dims(x)]
        return out

    def all_dims(self, node: Node) -> list[Space]:
        if self.is_multi(node):
            return [d for k, v in enumerate(node.meta["val"]) if isinstance(v, torch.Tensor)
                    for d in self.dims(node, k)]
        return self.dims(node) if self.has_dims(node) else []

    def where(self, node: Node) -> str:
        module = node_module(node)
        return f"{op_key(node.target)} in {module or '<root>'}"

    def unify(self, a: Space, b: Space, why: str = "") -> None:
        self.table.unify(a, b, why)

    def layout(self, s: Space, kind: str, parts: list[Space], why: str = "") -> None:
        self.table.layout(s, kind, parts, why)

    def freeze(self, spaces: list[Space], reason: str) -> None:
        for s in spaces:
            self.table.freeze(s, reason)

    def couple(self, node: Node, spaces: list[Space], what: str) -> None:
        """Freeze dims whose units ``node`` mixes so that removing one changes the others."""
        where = node_module(node) or "<root>"
        news = any(not self.table.find(s).frozen for s in spaces)  # inputs' dims (a sequence) are frozen already
        self.freeze(spaces, f"{what} in {where} couples all its units (removing one changes the others)")
        if news:
            self.diagnostics.append(Diagnostic(where, f"{op_key(node.target)}: {what} couples all its units; "
                                               f"that dim is left whole", "info"))

    def new_space(self, size: int) -> Space:
        return self.table.new(size)

    def constant(self, node: Node, space: Space) -> None:
        self.constants.append((node, space))

    def unknown(self, node: Node, why: str) -> None:
        spaces = self.all_dims(node) + [d for a in self.tensor_args(node) for d in self.all_dims(a)]
        reason = f"{op_key(node.target)} in {node_module(node) or '<root>'}: {why}"
        self.freeze(spaces, reason)
        values = [a.meta["val"] for a in [node, *self.tensor_args(node)] if self.has_dims(a)]
        carries_features = any(v.is_floating_point() for v in values)  # masks and indices carry no channels
        self.diagnostics.append(Diagnostic(node_module(node) or "<root>",
                                           f"{op_key(node.target)}: {why}; dims through it are frozen",
                                           "warning" if carries_features else "info"))
