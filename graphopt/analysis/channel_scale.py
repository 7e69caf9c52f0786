"""Which linear layer's output channels reach another's input channels through ops that commute with a scale.

SmoothQuant multiplies a layer's input by per-channel factors ``s``. When that input is computed from an
earlier layer's output only by ops that carry a per-channel scale through unchanged (reshapes, transposes,
attention's ``probs @ V``, products with other tensors), the factors can go into the earlier layer's
per-channel weight scales and bias instead, and the ``Mul`` disappears. This module proves that from the
exported graph, without running the model.

The proof tracks, for every value computed from the producer's output, which producer channel scales
each element: it starts with the code ``i + 1`` on channel ``i`` and applies each op to the codes
(data movement moves them, a product with an untracked tensor keeps them, ``a @ b`` keeps ``b``'s when
they do not vary along the summed dim, ``relu`` keeps them because the factors are positive). The fold is exact iff every value downstream of the producer is
covered by such a rule and the consumer's input carries code ``i + 1`` on its channel ``i``: scaling
the producer's channel ``i`` by ``s_i`` then scales the consumer's input channel ``i`` by ``s_i`` and
changes nothing else the model computes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ..frontend.aten import is_identity, op_packet, tensor_names

aten = torch.ops.aten

#: ops that only move, copy or select elements: applied to the codes as to the values
_MOVES = {aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.expand,
          aten.unsqueeze, aten.squeeze, aten.contiguous, aten.flatten, aten.unflatten, aten.slice, aten.select,
          aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.repeat, aten.expand_as, aten.view_as,
          aten.reshape_as, aten.movedim, aten.narrow}
#: ops that change only the dtype (the codes stay float64)
_CASTS = {aten._to_copy, aten.to, aten.type_as}
_PRODUCTS = {aten.mul, aten.div}
_SUMS = {aten.add, aten.sub}
_MATMULS = {aten.matmul, aten.bmm, aten.mm}
#: elementwise ops with ``f(s * x) = s * f(x)`` for every ``s > 0`` (SmoothQuant's factors are positive)
_POSITIVE_HOMOGENEOUS = {aten.relu, aten.leaky_relu, aten.abs}


class NotCommuting(Exception):
    """A value downstream of the producer does not carry its channel scale to the consumer; says why."""


def linear_call(ep: torch.export.ExportedProgram, layer: str) -> Node:
    """The one ``aten.linear`` node that reads ``{layer}.weight``; :class:`NotCommuting` when there is none or several."""
    names = tensor_names(ep)
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and op_packet(n) is aten.linear
             and isinstance(n.args[1], Node) and names.get(n.args[1].name) == f"{layer}.weight"]
    if len(calls) != 1:
        raise NotCommuting(f"{layer} is called {len(calls)} times as an nn.Linear in the captured graph (once needed)")
    return calls[0]


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _constant_along(codes: torch.Tensor, dim: int) -> bool:
    return bool(torch.equal(codes, codes.narrow(dim, 0, 1).expand_as(codes)))


def _rule(node: Node, codes: dict[Node, Any]) -> Any:
    """The codes of ``node``'s value from those of its tracked inputs, or raise :class:`NotCommuting`."""
    packet = op_packet(node) if node.op == "call_function" else None
    tracked = [a for a in node.all_input_nodes if a in codes]
    what = f"aten.{packet.__name__} (node {node.name})" if packet is not None else f"{node.target} (node {node.name})"
    if node.op == "call_function" and node.target is operator.getitem:
        return codes[node.args[0]][node.args[1]]
    if is_identity(node) or packet in _CASTS or packet in _POSITIVE_HOMOGENEOUS:
        if node.args[0] not in codes or (packet is not aten.type_as and tracked != [node.args[0]]):
            raise NotCommuting(f"{what} reads the scaled values as an argument other than its input")
        return codes[node.args[0]]
    if packet in _MOVES:
        if node.args[0] not in codes or len(node.all_input_nodes) > 1:
            raise NotCommuting(f"{what} moves the scaled values by sizes or indices computed in the graph")
        args = [codes[a] if a is node.args[0] else a for a in node.args]
        out = node.target(*args, **node.kwargs)
        return tuple(out) if isinstance(out, (list, tuple)) else out
    shape = _shape(node)
    if shape is None:
        raise NotCommuting(f"{what} has no tensor value recorded in the graph")
    if packet in _PRODUCTS:
        factors = [a for a in node.args[:2] if isinstance(a, Node) and a in codes]  # x * x counts twice
        if len(factors) != 1 or (packet is aten.div and node.args[0] not in codes):
            raise NotCommuting(f"{what} multiplies scaled values by scaled values (or divides by them)")
        return torch.broadcast_to(codes[factors[0]], shape)
    if packet in _SUMS:
        parts = [codes.get(a) if isinstance(a, Node) else None for a in node.args[:2]]
        if any(p is None for p in parts) or not torch.equal(*torch.broadcast_tensors(*parts)):
            raise NotCommuting(f"{what} adds a tensor that does not carry the same channel scales (a residual or a "
                               "bias added later)")
        return torch.broadcast_to(parts[0], shape)
    if packet in _MATMULS:
        a, b = node.args[:2]
        if a in codes and b not in codes and _constant_along(codes[a], -1):
            return torch.broadcast_to(codes[a].narrow(-1, 0, 1), shape)
        if b in codes and a not in codes and _constant_along(codes[b], -2):
            return torch.broadcast_to(codes[b].narrow(-2, 0, 1), shape)
        raise NotCommuting(f"{what} sums over the scaled channels")
    if packet is aten.scaled_dot_product_attention:
        v = node.args[2]
        if tracked != [v] or v in node.args[:2] or not _constant_along(codes[v], -2):
            raise NotCommuting(f"{what} reads the scaled values as queries, keys or mask, not only as values")
        try:
            return torch.broadcast_to(codes[v].narrow(-2, 0, 1), shape)
        except RuntimeError:
            raise NotCommuting(f"{what} regroups the value heads (grouped-query attention inside the op)") from None
    raise NotCommuting(f"{what} is not known to commute with a per-channel scale")


def producers_of(ep: torch.export.ExportedProgram, consumer: str, limit: int = 256) -> list[str]:
    """The ``nn.Linear`` layers whose output reaches ``consumer``'s input without passing another layer, nearest
    first (the candidates :func:`scale_path` judges); ``[]`` when the consumer is not one linear call."""
    try:
        end = linear_call(ep, consumer)
    except NotCommuting:
        return []
    names, found, seen = tensor_names(ep), [], set()
    todo = [end.args[0]]
    while todo and len(seen) < limit:
        node = todo.pop(0)
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and op_packet(node) is aten.linear:
            weight = names.get(node.args[1].name, "") if isinstance(node.args[1], Node) else ""
            if weight.endswith(".weight"):
                found.append(weight.removesuffix(".weight"))
            continue
        todo += node.all_input_nodes
    return list(dict.fromkeys(found))


def scale_path(ep: torch.export.ExportedProgram, producer: str, consumer: str) -> str:
    """``""`` when scaling ``producer``'s output channel ``i`` by ``s_i`` scales ``consumer``'s input channel ``i``
    by ``s_i`` and changes nothing else the graph computes; else why not (both are ``nn.Linear`` layer names)."""
    try:
        start, end = linear_call(ep, producer), linear_call(ep, consumer)
        width = _shape(start)
        if width is None or width[-1] != (_shape(end.args[0]) or (0,))[-1]:
            raise NotCommuting(f"{producer}'s output width differs from {consumer}'s input width")
        channel = torch.arange(1, width[-1] + 1, dtype=torch.float64)
        codes: dict[Node, Any] = {start: channel.expand(width)}
        nodes = list(ep.graph.nodes)
        for node in nodes[nodes.index(start) + 1:]:
            inputs = [a for a in node.all_input_nodes if a in codes]
            if not inputs:
                continue
            if node.op == "output":
                raise NotCommuting(f"{producer}'s output reaches the model's outputs without passing {consumer}")
            if node is end:
                if inputs != [end.args[0]]:
                    raise NotCommuting(f"{consumer} reads the scaled values as weights or bias")
                got = codes[end.args[0]]
                if not torch.equal(got, channel.expand(got.shape)):
                    raise NotCommuting(f"{consumer}'s input channels are not {producer}'s output channels one to one")
                continue
            if op_packet(node) is aten.linear:
                raise NotCommuting(f"{producer}'s output also feeds another layer ({node.name})")
            codes[node] = _rule(node, codes)
        if end.args[0] not in codes:
            raise NotCommuting(f"{consumer} does not read {producer}'s output")
    except NotCommuting as why:
        return str(why)
    return ""
