"""Helpers over captured graph nodes (exported and fx graphs): module paths, parameter FQNs, values.

``graph_view`` gives a networkx view of a captured graph for users to inspect and draw.
"""

from __future__ import annotations

import re
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.export import ExportedProgram


def _clean_path(path: str) -> str:
    """Normalise a module path from ``nn_module_stack`` (strict-mode ``L['self'].a[0]`` -> ``a.0``)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")


def _stack_top(node: fx.Node) -> tuple[str, Any] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack.values()))


def node_module_path(node: fx.Node) -> str:
    """FQN of the innermost module that produced ``node`` (``""`` for the root or unknown)."""
    if node.op == "call_module":
        return str(node.target)
    top = _stack_top(node)
    return _clean_path(top[0]) if top else ""


def node_module_type(node: fx.Node) -> str:
    """Class name (no module prefix) of the innermost module that produced ``node``, or ``""``."""
    top = _stack_top(node)
    if top is None:
        return ""
    cls = top[1]
    return (cls.__name__ if isinstance(cls, type) else str(cls)).rpartition(".")[2]


def node_param_fqn(exported: ExportedProgram | None, node: fx.Node) -> str | None:
    """FQN of the parameter, buffer or lifted constant that placeholder/get_attr ``node`` stands for."""
    if node.op == "get_attr":
        return str(node.target)
    if node.op != "placeholder" or exported is None:
        return None
    sig = exported.graph_signature
    for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
        if node.name in table:
            return table[node.name]
    return None


def param_nodes(exported: ExportedProgram) -> dict[str, fx.Node]:
    """Map each parameter/buffer/constant FQN to its placeholder node in the exported graph."""
    by_name = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    sig = exported.graph_signature
    out: dict[str, fx.Node] = {}
    for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
        out.update({fqn: by_name[name] for name, fqn in table.items() if name in by_name})
    return out


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """Groups of parameter/buffer FQNs that are the same tensor (tied weights), each sorted."""
    groups: dict[int, list[str]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        groups.setdefault(id(t), []).append(name)
    return [sorted(set(g)) for g in groups.values() if len(set(g)) > 1]


def node_value_info(node: fx.Node) -> tuple[tuple[int | str, ...] | None, str | None]:
    """``(shape, dtype)`` of a node's tensor value (export ``val`` or fx ``tensor_meta``); SymInts as str."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))  # tensor_meta is a NamedTuple with .shape
    if isinstance(val, (tuple, list)) and not hasattr(val, "shape"):
        val = next((v for v in val if hasattr(v, "shape")), None)
    if val is None or not hasattr(val, "shape"):
        return None, None
    shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
    return shape, str(val.dtype).removeprefix("torch.")


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
    return str(node.target)


def graph_view(graph: ExportedProgram | fx.GraphModule) -> nx.DiGraph:
    """A networkx DiGraph of an exported (or fx) graph, one graph node per fx node (keyed by name).

    Node attributes: ``op`` (fx op kind), ``target`` (e.g. ``aten.linear.default``), ``kind``
    (``input``/``parameter``/``buffer``/``constant``/``op``/``output``), ``module`` (FQN of the
    innermost module; a parameter's owner), ``module_type``, ``param`` (FQN or None), ``shape``,
    ``dtype`` and ``node`` (the fx node itself). Edge ``u -> v`` carries ``pos``: the positions of
    ``u`` in ``v``'s flattened args/kwargs.
    """
    exported = graph if isinstance(graph, ExportedProgram) else None
    gm_graph = graph.graph
    kinds: dict[str, str] = {}  # placeholder name (export) or get_attr target (fx) -> kind
    if exported is not None:
        sig = exported.graph_signature
        kinds.update({k: "parameter" for k in sig.inputs_to_parameters})
        kinds.update({k: "buffer" for k in sig.inputs_to_buffers})
        kinds.update({k: "constant" for k in sig.inputs_to_lifted_tensor_constants})
    else:
        kinds.update({k: "parameter" for k, _ in graph.named_parameters(remove_duplicate=False)})
        kinds.update({k: "buffer" for k, _ in graph.named_buffers(remove_duplicate=False)})
    g = nx.DiGraph(source="torch.export" if exported is not None else "torch.fx")
    for node in gm_graph.nodes:
        param = node_param_fqn(exported, node)
        if node.op == "placeholder":
            kind = kinds.get(node.name, "input")
        elif node.op == "get_attr":
            kind = kinds.get(str(node.target), "constant")
        else:
            kind = "output" if node.op == "output" else "op"
        module = param.rpartition(".")[0] if param is not None else node_module_path(node)
        shape, dtype = node_value_info(node)
        g.add_node(node.name, op=node.op, target=_target_name(node), kind=kind, module=module,
                   module_type=node_module_type(node), param=param, shape=shape, dtype=dtype, node=node)
        flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        for pos, arg in enumerate(flat):
            if isinstance(arg, fx.Node):
                if g.has_edge(arg.name, node.name):
                    g.edges[arg.name, node.name]["pos"].append(pos)
                else:
                    g.add_edge(arg.name, node.name, pos=[pos])
    return g
