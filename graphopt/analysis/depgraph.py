"""The dependency graph: groups of parameter slices that must shrink together.

Built by dimension propagation over the exported aten graph (rules in :mod:`graphopt.analysis.rules`):
every (tensor, dim) is a :class:`~graphopt.analysis.dims.Space`; rules unify spaces or give them concat /
product layouts; the leaves of those layouts that reach at least one parameter, and nothing frozen,
are the prunable groups. Attention heads and grouped-query attention fall out of the reshape and
SDPA rules with no per-model configuration; dims that reach model inputs/outputs, or pass through an
op without a rule, are frozen with a reason.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch.fx import Node

from ..frontend.nodes import node_module_path as node_module
from .diagnostics import Diagnostic
from .manager import AnalysisManager, register_analysis
from .norms import NormInfo, is_norm_like, probe_norm
from .rules import IGNORED, RULES, RuleContext, is_pointwise, op_key, pointwise


@dataclass
class Member:
    """One parameter/buffer dim in a group: ``positions[i]`` is the group unit at index ``i`` (-1: none)."""

    fqn: str
    dim: int
    positions: np.ndarray
    is_buffer: bool = False

    @property
    def module(self) -> str:
        return self.fqn.rpartition(".")[0]

    def kept_indices(self, keep_units: np.ndarray) -> np.ndarray:
        mask = (self.positions < 0) | np.isin(self.positions, keep_units)
        return np.nonzero(mask)[0]


@dataclass
class ConstantUse:
    """A size baked into the graph (a view shape, split size...) that follows a group's width."""

    node: str
    op: str
    module: str
    value: int
    positions: np.ndarray  # unit per index of the dim whose size the constant is
    from_inputs: bool = False  # also scales with an input dim (batch x heads): no attribute holds it


@dataclass
class Group:
    """Coupled parameter slices: pruning unit ``k`` removes ``positions == k`` from every member."""

    id: int
    units: int
    unit: str  # "channel" | "head" | "kv-head group" | "conv group"
    members: list[Member] = field(default_factory=list)
    constants: list[ConstantUse] = field(default_factory=list)
    head_spaces: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (module, positions)

    @property
    def params(self) -> set[tuple[str, int]]:
        return {(m.fqn, m.dim) for m in self.members if not m.is_buffer}

    @property
    def unit_width(self) -> int:
        m = self.members[0]
        return int((m.positions == 0).sum())

    @property
    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members})

    def __str__(self) -> str:
        width = f" x {self.unit_width}" if self.unit_width > 1 else ""
        names = ", ".join(f"{m.fqn}[{m.dim}]" for m in self.members[:6])
        more = f", ... (+{len(self.members) - 6})" if len(self.members) > 6 else ""
        return f"group {self.id}: {self.units} {self.unit}{'s' if self.units != 1 else ''}{width}: {names}{more}"


@dataclass
class FrozenDims:
    """Parameter dims that no group may touch, and why."""

    members: list[tuple[str, int]]
    reasons: list[str]


@dataclass
class DependencyGraph:
    """Prunable groups, frozen parameter dims, and diagnostics for one captured program."""

    groups: list[Group]
    frozen: list[FrozenDims]
    diagnostics: list[Diagnostic]
    seconds: float = 0.0
    fixed_constants: set[tuple[str, int]] = field(default_factory=set)  # (module, size) on frozen dims

    def group_of(self, fqn: str, dim: int) -> list[Group]:
        return [g for g in self.groups if (fqn, dim) in g.params]

    def to_networkx(self) -> nx.Graph:
        """A bipartite graph: group nodes ("group:3") linked to parameter-dim nodes ("fqn:dim")."""
        g = nx.Graph()
        for grp in self.groups:
            gid = f"group:{grp.id}"
            g.add_node(gid, kind="group", units=grp.units, unit=grp.unit)
            for m in grp.members:
                pid = f"{m.fqn}:{m.dim}"
                g.add_node(pid, kind="buffer" if m.is_buffer else "parameter", fqn=m.fqn, dim=m.dim)
                g.add_edge(gid, pid, unit_width=int((m.positions == 0).sum()))
        for fz in self.frozen:
            for fqn, dim in fz.members:
                g.add_node(f"{fqn}:{dim}", kind="frozen", fqn=fqn, dim=dim, reasons=fz.reasons)
        return g

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} prunable groups, {sum(len(f.members) for f in self.frozen)} frozen "
                 f"parameter dims, {len(self.diagnostics)} diagnostics ({self.seconds:.2f}s)"]
        lines += [f"  {g}" for g in self.groups]
        return "\n".join(lines)


def build_dependency_graph(ep: torch.export.ExportedProgram, *, freeze_outputs: bool = True,
                           norm_modules: set[str] | None = None) -> DependencyGraph:
    """Propagate dims over ``ep``'s graph and collect the groups of coupled parameter slices.

    ``norm_modules``: paths of modules recognised as LayerNorm/RMSNorm; reductions inside them are
    the norm's statistics (its width stays prunable, as for ``aten::layer_norm``).
    """
    start = time.perf_counter()
    ctx = RuleContext()
    ctx.norm_modules = set(norm_modules or ())
    sig = ep.graph_signature
    params, buffers = dict(sig.inputs_to_parameters), dict(sig.inputs_to_buffers)
    tensors: dict[str, tuple[str, bool]] = {k: (v, False) for k, v in params.items()}
    tensors.update({k: (v, True) for k, v in buffers.items()})
    user_inputs = set(sig.user_inputs)
    ctx.weights = set(tensors)
    tied: dict[int, Node] = {}  # tied weights are one tensor under several placeholders
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            value = ep.state_dict.get(tensors[node.name][0]) if node.name in tensors else None
            if value is not None and ctx.has_dims(node):
                first = tied.setdefault(id(value), node)
                for a, b in zip(ctx.dims(first), ctx.dims(node)):
                    ctx.unify(a, b, f"{tensors[node.name][0]} is tied to {tensors[first.name][0]}")
            if node.name not in tensors and ctx.has_dims(node):
                reason = "model input" if node.name in user_inputs else "graph constant"
                ctx.freeze(ctx.dims(node), reason)
        elif node.op == "call_function":
            _apply_rule(ctx, node)
        elif node.op == "output" and freeze_outputs:
            outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            for o in outs:
                if isinstance(o, Node):
                    ctx.freeze(ctx.all_dims(o), "reaches a model output")
    # The sizes of SDPA head dims follow their group (module attributes such as num_heads).
    for node in ep.graph.nodes:
        if node.op == "call_function" and op_key(node.target) == "aten::scaled_dot_product_attention":
            q, k = ctx.dims(node.args[0]), ctx.dims(node.args[1])
            if len(q) >= 3:
                ctx.heads += [(node, q[-3]), (node, k[-3])]
    graph = _collect(ctx, ep, tensors)
    graph.seconds = time.perf_counter() - start
    return graph


def _apply_rule(ctx: RuleContext, node: Node) -> None:
    key = op_key(node.target)
    if key in IGNORED or not (ctx.all_dims(node) or ctx.tensor_args(node)):
        return
    fn = RULES.get(key) or (pointwise if is_pointwise(node.target) else None)
    if fn is None:
        ctx.unknown(node, "no dimension rule")
        return
    try:
        fn(ctx, node)
    except Exception as e:  # a rule that cannot read this node must not guess
        ctx.unknown(node, f"rule failed ({type(e).__name__}: {e})")


def _collect(ctx: RuleContext, ep: torch.export.ExportedProgram,
             tensors: dict[str, tuple[str, bool]]) -> DependencyGraph:
    table = ctx.table
    table.check_products()
    frozen = table.frozen_reasons()
    members: dict[int, list[Member]] = defaultdict(list)
    frozen_members: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    unused = _unused_tensors(ep, tensors)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in tensors or not ctx.has_dims(node):
            continue
        fqn, is_buffer = tensors[node.name]
        if node.name in unused:
            if not is_buffer:
                frozen_members[("never used by the traced forward: left alone",)] += [
                    (fqn, d) for d in range(len(ctx.dims(node)))]
                ctx.diagnostics.append(Diagnostic(fqn.rpartition(".")[0] or "<root>", f"{fqn} is never used by "
                                                  f"the traced forward: prune leaves it alone", "info"))
            continue
        for dim, space in enumerate(ctx.dims(node)):
            for leaf_id, pos in table.positions(space).items():
                if leaf_id in frozen:
                    if not is_buffer and table.spaces[leaf_id].size > 1:
                        frozen_members[tuple(frozen[leaf_id][:3])].append((fqn, dim))
                else:
                    members[leaf_id].append(Member(fqn, dim, pos, is_buffer))
    head_leaves: dict[int, str] = {}
    for _node, space in ctx.heads:
        for leaf_id, pos in table.positions(space).items():
            per_unit = int((pos == 0).sum())
            if head_leaves.get(leaf_id) != "kv-head group":
                head_leaves[leaf_id] = "kv-head group" if per_unit > 1 else "head"
    groups: list[Group] = []
    by_leaf: dict[int, Group] = {}
    for leaf_id, mem in members.items():
        if all(m.is_buffer for m in mem) or table.spaces[leaf_id].size < 2:
            continue
        unit = head_leaves.get(leaf_id, "channel")
        if unit == "channel" and min(int((m.positions == 0).sum()) for m in mem) > 1:
            unit = "channel block"
        grp = Group(len(groups), table.spaces[leaf_id].size, unit, sorted(mem, key=lambda m: (m.fqn, m.dim)))
        groups.append(grp)
        by_leaf[leaf_id] = grp
    fixed: set[tuple[str, int]] = set()
    for node, space in ctx.constants:
        # e.g. batch x heads: computed from input shapes, never held by an attribute
        from_inputs = any("model input" in r for leaf in table.leaves(space) for r in frozen.get(leaf.id, ()))
        if not from_inputs and not any(leaf_id in by_leaf for leaf_id in table.positions(space)):
            fixed.add((node_module(node), table.find(space).size))  # a size that must stay what it is
        for leaf_id, pos in table.positions(space).items():
            if leaf_id in by_leaf:
                by_leaf[leaf_id].constants.append(ConstantUse(
                    node.name, op_key(node.target), node_module(node), table.find(space).size, pos, from_inputs))
    for node, space in ctx.heads:
        for leaf_id, pos in table.positions(space).items():
            if leaf_id in by_leaf:
                by_leaf[leaf_id].head_spaces.append((node_module(node), pos))
    frozen_list = [FrozenDims(sorted(set(v)), list(k)) for k, v in frozen_members.items()]
    return DependencyGraph(groups, frozen_list, ctx.diagnostics, fixed_constants=fixed)


def _unused_tensors(ep: torch.export.ExportedProgram, tensors: dict[str, tuple[str, bool]]) -> set[str]:
    """Placeholders of parameters/buffers that no node reads (and that no used placeholder is tied to)."""
    def value(name: str) -> Any:
        fqn = tensors[name][0]
        return ep.state_dict.get(fqn, ep.constants.get(fqn))

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in tensors]
    used = {id(value(n.name)) for n in placeholders if n.users}
    return {n.name for n in placeholders if not n.users and id(value(n.name)) not in used}


def norm_module_paths(model: torch.nn.Module) -> set[str]:
    """Paths of the submodules that probe as LayerNorm or RMSNorm (see :mod:`.norms`)."""
    out = set()
    for name, module in model.named_modules():
        if is_norm_like(module) and not isinstance(module, torch.nn.modules.batchnorm._NormBase):
            try:
                if isinstance(probe_norm(module), NormInfo):
                    out.add(name)
            except Exception:  # a module the probe cannot run is simply not a recognised norm
                continue
    return out


@register_analysis("dependency_graph")
def _dependency_graph(program: Any, am: AnalysisManager) -> DependencyGraph:
    return build_dependency_graph(am.get("exported"), norm_modules=norm_module_paths(program.module))


@register_analysis("dependency_graph_outputs")
def _dependency_graph_outputs(program: Any, am: AnalysisManager) -> DependencyGraph:
    return build_dependency_graph(am.get("exported"), freeze_outputs=False,
                                  norm_modules=norm_module_paths(program.module))
