"""What aten ops in an exported graph compute, as the passes that read layer calls need it.

``fold_bn`` (which BatchNorm folds into which layer) and ``merge_layers``' links (which layer feeds
which) both ask the same questions of a node: is it an op that returns its input, is it a
conv/linear call, and which weight and bias does it read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

aten = torch.ops.aten

CONV_OPS = {aten.conv1d, aten.conv2d, aten.conv3d}
CONV_T_OPS = {aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d}
DROPOUT_OPS = {aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout}
#: Ops that return their input unchanged in eval mode (dropouts only with ``train=False``, see :func:`is_identity`).
IDENTITY_OPS = {aten.clone, aten.alias, *DROPOUT_OPS}


class NotALayerCall(Exception):
    """A matmul whose weight operand is not a layer's weight read as-is; the message says why."""


def op_packet(node: Node) -> Any:
    """The overload packet of a ``call_function`` node (``aten.add`` for ``aten.add.Tensor``), else ``None``."""
    return getattr(node.target, "overloadpacket", None)


def is_identity(node: object) -> bool:
    """Whether ``node`` returns its input unchanged (a clone, an alias, an eval-mode dropout)."""
    if not isinstance(node, Node):
        return False
    packet = op_packet(node)
    if packet in DROPOUT_OPS:
        return not node.args[-1]  # a training-mode dropout is not an identity
    return packet in IDENTITY_OPS


def op_name(node: Node) -> str:
    """How a message names ``node``: ``aten.conv2d``, ``the model input 'x'``, ``call_module fc``."""
    if node.op == "placeholder":
        return f"the model input {node.name!r}"
    if node.op == "call_function":
        packet = op_packet(node)
        return f"aten.{packet.__name__}" if packet is not None else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def tensor_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name -> FQN of the parameter or buffer it stands for."""
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def is_transpose(node: Node) -> bool:
    """Whether ``node`` swaps the two dims of a matrix (how export writes ``weight.t()``)."""
    packet = op_packet(node)
    if packet is aten.permute:
        return list(node.args[1]) == [1, 0]
    if packet is aten.transpose:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    return packet in (aten.t, aten.numpy_T)


def conv_args(node: Node) -> tuple[str, Any, Any] | None:
    """``(kind, weight arg, bias arg)`` when ``node`` is a conv / transposed conv / linear call, else ``None``.

    ``kind`` is ``"conv"``, ``"conv_t"`` or ``"linear"``. A ``mm``/``addmm`` counts as a linear call
    only when its second operand is a transposed weight read by nothing else; otherwise
    :class:`NotALayerCall` says why.
    """
    packet, args = op_packet(node), node.args
    if packet in CONV_OPS:
        return "conv", args[1], args[2] if len(args) > 2 else None
    if packet in CONV_T_OPS:
        return "conv_t", args[1], args[2] if len(args) > 2 else None
    if packet is aten.convolution:
        return ("conv_t" if args[6] else "conv"), args[1], args[2]
    if packet is aten.linear:
        return "linear", args[1], args[2] if len(args) > 2 else None
    if packet in (aten.mm, aten.addmm):
        weight_t = args[-1]
        if not (isinstance(weight_t, Node) and is_transpose(weight_t) and len(weight_t.users) == 1):
            raise NotALayerCall(f"input comes from {op_name(node)} whose weight is not a transposed Linear weight")
        return "linear", weight_t.args[0], args[0] if packet is aten.addmm else None
    return None
