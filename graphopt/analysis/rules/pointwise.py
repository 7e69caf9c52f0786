"""Rules for elementwise ops (broadcasting) and ``getitem``."""

from __future__ import annotations

from torch.fx import Node

from .base import RuleContext, arg, broadcast, norm_dim, op_key, rule


def pointwise(ctx: RuleContext, node: Node) -> None:
    broadcast(ctx, ctx.dims(node), [ctx.dims(a) for a in ctx.tensor_args(node)], ctx.where(node))


@rule("aten::__and__", "aten::__or__", "aten::bitwise_and", "aten::bitwise_or", "aten::bitwise_not",
      "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::clone", "aten::contiguous",
      "aten::_to_copy", "aten::to", "aten::alias", "aten::detach", "aten::lift_fresh_copy",
      "aten::dropout", "aten::type_as", "aten::zeros_like", "aten::ones_like", "aten::full_like",
      "aten::empty_like", "aten::rand_like", "aten::randn_like", "aten::cumsum", "aten::masked_fill",
      "aten::where", "aten::clamp", "aten::hardtanh", "aten::gelu", "aten::silu", "aten::relu",
      "aten::native_dropout", "aten::feature_dropout", "aten::alpha_dropout")
def elementwise(ctx: RuleContext, node: Node) -> None:
    pointwise(ctx, node)


@rule("getitem")
def getitem(ctx: RuleContext, node: Node) -> None:
    src, index = node.args[0], node.args[1]
    if isinstance(src, Node) and isinstance(index, int) and ctx.has_dims(node):
        for a, b in zip(ctx.dims(src, index), ctx.dims(node)):
            ctx.unify(a, b, ctx.where(node))


@rule("aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax", "aten::_safe_softmax")
def softmax(ctx: RuleContext, node: Node) -> None:
    """Elementwise in shape, but every unit of ``dim`` shares one denominator."""
    pointwise(ctx, node)
    x = ctx.dims(node.args[0])
    dim = norm_dim(arg(node, 1, "dim", -1), len(x))
    if x[dim].size > 1:
        ctx.couple(node, [x[dim]], f"{op_key(node.target).split('::')[-1]} over this dim")
