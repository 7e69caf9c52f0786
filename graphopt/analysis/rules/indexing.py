"""Rules for concatenation, splitting, slicing, indexing and padding (cat layouts and ranges)."""

from __future__ import annotations

from torch.fx import Node

from .base import RuleContext, arg, norm_dim, op_key, rule


@rule("aten::cat", "aten::concat", "aten::concatenate")
def cat(ctx: RuleContext, node: Node) -> None:
    parts = [p for p in node.args[0] if isinstance(p, Node)]
    out, why = ctx.dims(node), ctx.where(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(out))
    dims = [ctx.dims(p) for p in parts]
    dims = [d for d in dims if len(d) == len(out)]  # legacy empty tensors
    for d in dims:
        for k in range(len(out)):
            if k != dim:
                ctx.unify(d[k], out[k], why)
    ctx.layout(out[dim], "cat", [d[dim] for d in dims], why)


@rule("aten::stack")
def stack(ctx: RuleContext, node: Node) -> None:
    out, why = ctx.dims(node), ctx.where(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(out))
    for p in node.args[0]:
        d = ctx.dims(p)
        rest = out[:dim] + out[dim + 1:]
        for a, b in zip(d, rest):
            ctx.unify(a, b, why)


@rule("aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unsafe_split", "aten::tensor_split")
def split(ctx: RuleContext, node: Node) -> None:
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    n_out = len(node.meta["val"])
    dim = norm_dim(arg(node, 2, "dim", 0), len(x))
    pieces = [ctx.dims(node, k) for k in range(n_out)]
    for piece in pieces:
        for k in range(len(x)):
            if k != dim:
                ctx.unify(piece[k], x[k], why)
    ctx.layout(x[dim], "cat", [p[dim] for p in pieces], why)
    if op_key(node.target) in ("aten::split", "aten::split_with_sizes", "aten::unsafe_split"):
        for p in pieces:
            ctx.constant(node, p[dim])


@rule("aten::unbind")
def unbind(ctx: RuleContext, node: Node) -> None:
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(x))
    ctx.freeze([x[dim]], f"{why}: unbind")
    rest = x[:dim] + x[dim + 1:]
    for k in range(len(node.meta["val"])):
        for a, b in zip(ctx.dims(node, k), rest):
            ctx.unify(a, b, why)


@rule("aten::slice")
def slice_(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = norm_dim(arg(node, 1, "dim", 0), len(x))
    for k in range(len(x)):
        if k == dim and x[k].size != out[k].size:
            ctx.freeze([x[k], out[k]], f"{why}: sliced with constant bounds")
        else:
            ctx.unify(x[k], out[k], why)


@rule("aten::select")
def select(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = norm_dim(node.args[1], len(x))
    ctx.freeze([x[dim]], f"{why}: select picks one index")
    for a, b in zip(x[:dim] + x[dim + 1:], out):
        ctx.unify(a, b, why)


@rule("aten::index_select")
def index_select(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = norm_dim(node.args[1], len(x))
    ctx.freeze([x[dim]], f"{why}: rows selected by index")
    for k in range(len(x)):
        if k != dim:
            ctx.unify(x[k], out[k], why)


@rule("aten::index")
def index(ctx: RuleContext, node: Node) -> None:
    """Advanced indexing with one index tensor: the indexed dim is frozen, the others pass through."""
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    indices = list(node.args[1])
    used = [k for k, i in enumerate(indices) if i is not None]
    if len(used) != 1 or not ctx.has_dims(indices[used[0]]):
        ctx.unknown(node, "indexing with several index tensors")
        return
    p, idx = used[0], ctx.dims(indices[used[0]])
    ctx.freeze([x[p]], f"{why}: entries selected by an index tensor")
    expected = x[:p] + idx + x[p + 1:]
    if len(expected) != len(out):
        ctx.unknown(node, "unexpected index result shape")
        return
    for a, b in zip(x[:p] + idx + x[p + 1:], out):
        ctx.unify(a, b, why)


@rule("aten::gather")
def gather(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = norm_dim(node.args[1], len(x))
    index = ctx.dims(node.args[2])
    ctx.freeze([x[dim]], f"{why}: entries gathered by index")
    for k, (o, i) in enumerate(zip(out, index)):
        ctx.unify(o, i, why)
        if k != dim and x[k].size == o.size:
            ctx.unify(x[k], o, why)


@rule("aten::constant_pad_nd", "aten::pad")
def pad(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    for a, b in zip(x, out):
        if a.size == b.size:
            ctx.unify(a, b, why)
        else:
            ctx.freeze([a, b], f"{why}: padded")
