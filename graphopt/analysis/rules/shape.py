"""Rules for shape ops: view/reshape/flatten (prod layouts), permute/transpose, expand, repeat_interleave."""

from __future__ import annotations

from torch.fx import Node

from ..dims import Space
from .base import RuleContext, arg, norm_dim, op_key, rule

# --- shape ops ---------------------------------------------------------------------------------

def reshape_dims(ctx: RuleContext, x: list[Space], out: list[Space], why: str) -> None:
    """Match contiguous blocks of equal product; 1->n and n->1 blocks become ``prod`` layouts."""
    xs = [d for d in x if d.size != 1]
    os_ = [d for d in out if d.size != 1]
    i = j = 0
    while i < len(xs) and j < len(os_):
        bi, bj = [xs[i]], [os_[j]]
        pi, pj = xs[i].size, os_[j].size
        while pi != pj:
            if pi < pj and i + 1 < len(xs):
                i += 1
                bi.append(xs[i])
                pi *= xs[i].size
            elif pj < pi and j + 1 < len(os_):
                j += 1
                bj.append(os_[j])
                pj *= os_[j].size
            else:
                ctx.freeze(xs + os_, f"{why}: reshape {[d.size for d in x]} -> {[d.size for d in out]}")
                return
        if len(bi) == 1 and len(bj) == 1:
            ctx.unify(bi[0], bj[0], why)
        elif len(bi) == 1:
            ctx.layout(bi[0], "prod", bj, why)
        elif len(bj) == 1:
            ctx.layout(bj[0], "prod", bi, why)
        else:
            ctx.freeze(bi + bj, f"{why}: reshape mixes {[d.size for d in bi]} into {[d.size for d in bj]}")
        i += 1
        j += 1


@rule("aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten",
      "aten::squeeze", "aten::unsqueeze", "aten::view_as", "aten::reshape_as")
def view(ctx: RuleContext, node: Node) -> None:
    out = ctx.dims(node)
    reshape_dims(ctx, ctx.dims(node.args[0]), out, ctx.where(node))
    if op_key(node.target) in ("aten::view", "aten::reshape", "aten::_unsafe_view") and len(node.args) > 1:
        shape = node.args[1]
        if isinstance(shape, (list, tuple)):
            for k, v in enumerate(shape):
                if isinstance(v, int) and v > 1 and k < len(out):
                    ctx.constant(node, out[k])


@rule("aten::permute")
def permute(ctx: RuleContext, node: Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.dims(node)
    for k, d in enumerate(node.args[1]):
        ctx.unify(out[k], x[norm_dim(d, len(x))], ctx.where(node))


@rule("aten::transpose", "aten::t", "aten::swapaxes")
def transpose(ctx: RuleContext, node: Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.dims(node)
    perm = list(range(len(x)))
    if len(x) >= 2:
        a, b = (node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1)
        a, b = norm_dim(a, len(x)), norm_dim(b, len(x))
        perm[a], perm[b] = perm[b], perm[a]
    for k, src in enumerate(perm):
        ctx.unify(out[k], x[src], ctx.where(node))


@rule("aten::numpy_T", "aten::mT", "aten::mH", "aten::adjoint")
def reverse_dims(ctx: RuleContext, node: Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.dims(node)
    perm = list(range(len(x)))[::-1] if op_key(node.target) == "aten::numpy_T" else (
        list(range(len(x) - 2)) + [len(x) - 1, len(x) - 2])
    for k, src in enumerate(perm):
        ctx.unify(out[k], x[src], ctx.where(node))


@rule("aten::expand", "aten::expand_as", "aten::broadcast_to")
def expand(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    for k in range(1, len(out) + 1):
        if k <= len(x) and x[-k].size == out[-k].size:
            ctx.unify(x[-k], out[-k], why)
        elif out[-k].size != 1:
            ctx.freeze([out[-k]], f"{why}: broadcast by expand")
            if op_key(node.target) in ("aten::expand", "aten::broadcast_to"):
                ctx.constant(node, out[-k])


@rule("aten::repeat_interleave")
def repeat_interleave(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        ctx.unknown(node, "repeat_interleave with tensor repeats or no dim")
        return
    dim = norm_dim(dim, len(x))
    for k in range(len(x)):
        if k != dim:
            ctx.unify(x[k], out[k], why)
    rep = ctx.new_space(repeats)
    ctx.freeze([rep], f"{why}: copies made by repeat_interleave")
    ctx.layout(out[dim], "prod", [x[dim], rep], why)
