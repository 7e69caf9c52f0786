"""Which layers feed which in a captured graph: the links ``merge_layers`` works on.

A *link* is a conv/linear layer whose output goes only to another conv/linear layer, directly (ops
that return their input aside) or through one activation *module* (``nn.ReLU``, ``nn.GELU``, ...)
called once. A *residual* is a module whose whole forward is ``x + layer(x)``. Layers are stock
``nn.Conv1d/2d/3d`` / ``nn.Linear`` modules called once; anything else is left out with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Node

from graphopt.frontend.aten import NotALayerCall, conv_args, is_identity, op_packet, tensor_names
from graphopt.frontend.nodes import node_module_path

from .layer_math import CONVS

aten = torch.ops.aten

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Tanh,
               nn.Sigmoid, nn.ELU, nn.Mish, nn.Hardtanh, nn.PReLU, nn.Softplus)


@dataclass
class Link:
    """``b`` reads the output of ``a`` (through activation module ``act`` when set)."""

    a: str
    b: str
    act: str | None
    shape_a: tuple[int, ...]  # the input shape of a (for timing and checks)
    shape_b: tuple[int, ...]


@dataclass
class Residual:
    """Module ``module`` computes ``x + layer(x)``."""

    module: str
    layer: str
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]


def _shape(node: object) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _through_identities(node: object) -> object:
    while is_identity(node) and len(node.users) == 1:
        node = node.args[0]
    return node


class GraphLinks:
    """The layers of one exported graph, their links and residual modules."""

    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        names = tensor_names(ep)
        self.layer_of: dict[Node, str] = {}
        calls = Counter(node_module_path(n) for n in ep.graph.nodes if n.op == "call_function")
        self.calls = calls
        for node in ep.graph.nodes:
            if node.op != "call_function":
                continue
            try:
                found = conv_args(node)
            except NotALayerCall:
                continue
            if found is None or found[0] == "conv_t" or not isinstance(found[1], Node):
                continue
            fqn = names.get(found[1].name, "")
            owner = fqn.rpartition(".")[0]
            module = self.modules.get(owner)
            if fqn.endswith(".weight") and type(module) in (*CONVS, nn.Linear) and len(found[1].users) == 1:
                self.layer_of[node] = owner
        self.links = [link for node in self.layer_of if (link := self._link_into(node)) is not None]
        self.residuals = [r for node in ep.graph.nodes if (r := self._residual(node)) is not None]

    def _link_into(self, node: Node) -> Link | None:
        src = _through_identities(node.args[0])
        act = None
        if isinstance(src, Node) and src not in self.layer_of and src.op == "call_function" and len(src.users) == 1:
            path = node_module_path(src)
            if isinstance(self.modules.get(path), ACTIVATIONS) and self.calls[path] == 1:
                act, src = path, _through_identities(src.args[0])
        if not (isinstance(src, Node) and src in self.layer_of and len(src.users) == 1):
            return None
        return Link(self.layer_of[src], self.layer_of[node], act, _shape(src.args[0]), _shape(node.args[0]))

    def _residual(self, node: Node) -> Residual | None:
        if node.op != "call_function" or op_packet(node) is not aten.add or len(node.args) != 2:
            return None
        if len(node.kwargs) and node.kwargs.get("alpha", 1) != 1:
            return None
        x, y = node.args
        for a, b in ((x, y), (y, x)):
            b = _through_identities(b)
            if not (isinstance(b, Node) and b in self.layer_of and len(b.users) == 1):
                continue
            if _through_identities(b.args[0]) is not a and b.args[0] is not a:
                continue
            module = node_module_path(node)
            layer = self.layer_of[b]
            # the module's forward must be exactly x + layer(x): its ops are the layer's and the add
            if not module or not layer.startswith(f"{module}.") or self.calls[module] != 1:
                continue
            inside = [n for n in node.graph.nodes if n.op == "call_function" and
                      (node_module_path(n) + ".").startswith(f"{module}.")]
            if any(n is not node and n is not b and not is_identity(n) for n in inside):
                continue
            return Residual(module, layer, _shape(a), _shape(node))
        return None
