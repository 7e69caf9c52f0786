"""Dimension-propagation rules, one per aten op family.

A rule relates the dims of an op's tensor inputs and outputs through a :class:`RuleContext`
(``unify``, ``layout``, ``freeze``, ``constant``). An op with no rule freezes every dim that flows
through it, and the dependency graph reports it: never a wrong cut.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from .dims import Space

if TYPE_CHECKING:
    from .depgraph import RuleContext

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


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- elementwise and shape-preserving ----------------------------------------------------------

def broadcast(ctx: RuleContext, out: list[Space], inputs: list[list[Space]], why: str) -> None:
    """Right-aligned broadcasting: equal non-1 dims are the same space; size-1 inputs broadcast."""
    for dims in inputs:
        for k in range(1, min(len(dims), len(out)) + 1):
            a, o = dims[-k], out[-k]
            if a.size == o.size and a.size != 1:
                ctx.unify(a, o, why)
            elif a.size != 1:
                ctx.freeze([a, o], f"{why}: cannot broadcast {a.size} to {o.size}")


def pointwise(ctx: RuleContext, node: Node) -> None:
    broadcast(ctx, ctx.dims(node), [ctx.dims(a) for a in ctx.tensor_args(node)], ctx.where(node))


@rule("aten::__and__", "aten::__or__", "aten::bitwise_and", "aten::bitwise_or", "aten::bitwise_not",
      "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::alias", "aten::detach",
      "aten::lift_fresh_copy", "aten::dropout", "aten::type_as", "aten::zeros_like", "aten::ones_like",
      "aten::full_like", "aten::empty_like", "aten::rand_like", "aten::randn_like", "aten::softmax",
      "aten::_softmax", "aten::log_softmax", "aten::_log_softmax", "aten::cumsum", "aten::masked_fill",
      "aten::where", "aten::clamp", "aten::hardtanh", "aten::gelu", "aten::silu", "aten::relu",
      "aten::_safe_softmax", "aten::native_dropout", "aten::feature_dropout", "aten::alpha_dropout")
def elementwise(ctx: RuleContext, node: Node) -> None:
    pointwise(ctx, node)


@rule("getitem")
def getitem(ctx: RuleContext, node: Node) -> None:
    src, index = node.args[0], node.args[1]
    if isinstance(src, Node) and isinstance(index, int) and ctx.has_dims(node):
        for a, b in zip(ctx.dims(src, index), ctx.dims(node)):
            ctx.unify(a, b, ctx.where(node))


# --- linear algebra ----------------------------------------------------------------------------

@rule("aten::linear")
def linear(ctx: RuleContext, node: Node) -> None:
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    b = _arg(node, 2, "bias")
    out, why = ctx.dims(node), ctx.where(node)
    ctx.unify(x[-1], w[1], why)
    ctx.unify(out[-1], w[0], why)
    if isinstance(b, Node):
        ctx.unify(ctx.dims(b)[0], w[0], why)
    broadcast(ctx, out[:-1], [x[:-1]], why)


@rule("aten::addmm")
def addmm(ctx: RuleContext, node: Node) -> None:
    b, x, w = (ctx.dims(a) for a in node.args[:3])
    out, why = ctx.dims(node), ctx.where(node)
    ctx.unify(x[1], w[0], why)
    ctx.unify(out[1], w[1], why)
    ctx.unify(out[0], x[0], why)
    broadcast(ctx, out, [b], why)


@rule("aten::mm", "aten::bmm", "aten::matmul")
def matmul(ctx: RuleContext, node: Node) -> None:
    a, b = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    out, why = ctx.dims(node), ctx.where(node)
    if len(a) < 2 or len(b) < 2:
        ctx.unknown(node, "matmul with a 1-D operand")
        return
    ctx.unify(a[-1], b[-2], why)
    ctx.unify(out[-2], a[-2], why)
    ctx.unify(out[-1], b[-1], why)
    broadcast(ctx, out[:-2], [a[:-2], b[:-2]], why)


@rule("aten::baddbmm", "aten::addbmm")
def baddbmm(ctx: RuleContext, node: Node) -> None:
    base, a, b = (ctx.dims(x) for x in node.args[:3])
    out, why = ctx.dims(node), ctx.where(node)
    ctx.unify(a[-1], b[-2], why)
    ctx.unify(out[-2], a[-2], why)
    ctx.unify(out[-1], b[-1], why)
    broadcast(ctx, out[:-2], [a[:-2], b[:-2]], why)
    broadcast(ctx, out, [base], why)


@rule("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution")
def conv(ctx: RuleContext, node: Node) -> None:
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    b = _arg(node, 2, "bias")
    out, why = ctx.dims(node), ctx.where(node)
    packet = op_key(node.target)
    transposed = bool(node.args[6]) if packet in ("aten::convolution", "aten::_convolution") else False
    groups = node.args[8] if packet in ("aten::convolution", "aten::_convolution") else _arg(node, 6, "groups", 1)
    ctx.unify(out[0], x[0], why)
    ctx.freeze(w[2:], f"{why}: kernel window")
    if transposed:
        if groups != 1:
            ctx.freeze([x[1], w[0], w[1], out[1]], f"{why}: grouped transposed convolution")
        ctx.unify(x[1], w[0], why)
        ctx.unify(out[1], w[1], why)
    elif groups == 1:
        ctx.unify(x[1], w[1], why)
        ctx.unify(out[1], w[0], why)
    else:  # channels = groups x channels-per-group; pruning keeps whole groups
        g, per_group_out = ctx.new_space(groups), ctx.new_space(w[0].size // groups)
        ctx.freeze([w[1], per_group_out], f"{why}: channels within a conv group (whole groups are pruned)")
        ctx.layout(x[1], "prod", [g, w[1]], why)
        ctx.layout(w[0], "prod", [g, per_group_out], why)
        ctx.unify(out[1], w[0], why)
    if isinstance(b, Node):
        ctx.unify(ctx.dims(b)[0], out[1], why)


# --- normalisation and embedding ---------------------------------------------------------------

@rule("aten::layer_norm", "aten::native_layer_norm")
def layer_norm(ctx: RuleContext, node: Node) -> None:
    x = ctx.dims(node.args[0])
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    why = ctx.where(node)
    k = len(node.args[1])
    broadcast(ctx, out, [x], why)
    for idx in (2, 3):
        p = _arg(node, idx, "weight" if idx == 2 else "bias")
        if isinstance(p, Node):
            broadcast(ctx, x[-k:], [ctx.dims(p)], why)


@rule("aten::batch_norm", "aten::_native_batch_norm_legit_no_training", "aten::_native_batch_norm_legit",
      "aten::native_batch_norm", "aten::instance_norm")
def batch_norm(ctx: RuleContext, node: Node) -> None:
    x = ctx.dims(node.args[0])
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    why = ctx.where(node)
    broadcast(ctx, out, [x], why)
    for p in node.args[1:5]:
        if isinstance(p, Node) and ctx.has_dims(p) and len(ctx.dims(p)) == 1:
            ctx.unify(ctx.dims(p)[0], x[1], why)


@rule("aten::group_norm", "aten::native_group_norm")
def group_norm(ctx: RuleContext, node: Node) -> None:
    x = ctx.dims(node.args[0])
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    why = ctx.where(node)
    broadcast(ctx, out, [x], why)
    for p in node.args[2:4] if op_key(node.target) == "aten::group_norm" else node.args[1:3]:
        if isinstance(p, Node):
            ctx.unify(ctx.dims(p)[0], x[1], why)
    ctx.freeze([x[1]], f"{why}: group_norm channels (num_groups is not resized yet)")


@rule("aten::embedding")
def embedding(ctx: RuleContext, node: Node) -> None:
    w, idx = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    out, why = ctx.dims(node), ctx.where(node)
    ctx.unify(out[-1], w[1], why)
    broadcast(ctx, out[:-1], [idx], why)
    ctx.freeze([w[0]], f"{why}: rows are selected by input data")


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
        ctx.unify(out[k], x[_norm_dim(d, len(x))], ctx.where(node))


@rule("aten::transpose", "aten::t", "aten::swapaxes")
def transpose(ctx: RuleContext, node: Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.dims(node)
    perm = list(range(len(x)))
    if len(x) >= 2:
        a, b = (node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1)
        a, b = _norm_dim(a, len(x)), _norm_dim(b, len(x))
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
    repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        ctx.unknown(node, "repeat_interleave with tensor repeats or no dim")
        return
    dim = _norm_dim(dim, len(x))
    for k in range(len(x)):
        if k != dim:
            ctx.unify(x[k], out[k], why)
    rep = ctx.new_space(repeats)
    ctx.freeze([rep], f"{why}: copies made by repeat_interleave")
    ctx.layout(out[dim], "prod", [x[dim], rep], why)


@rule("aten::cat", "aten::concat", "aten::concatenate")
def cat(ctx: RuleContext, node: Node) -> None:
    parts = [p for p in node.args[0] if isinstance(p, Node)]
    out, why = ctx.dims(node), ctx.where(node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
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
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    for p in node.args[0]:
        d = ctx.dims(p)
        rest = out[:dim] + out[dim + 1:]
        for a, b in zip(d, rest):
            ctx.unify(a, b, why)


@rule("aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unsafe_split", "aten::tensor_split")
def split(ctx: RuleContext, node: Node) -> None:
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    n_out = len(node.meta["val"])
    dim = _norm_dim(_arg(node, 2, "dim", 0), len(x))
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
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(x))
    ctx.freeze([x[dim]], f"{why}: unbind")
    rest = x[:dim] + x[dim + 1:]
    for k in range(len(node.meta["val"])):
        for a, b in zip(ctx.dims(node, k), rest):
            ctx.unify(a, b, why)


@rule("aten::slice")
def slice_(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(x))
    for k in range(len(x)):
        if k == dim and x[k].size != out[k].size:
            ctx.freeze([x[k], out[k]], f"{why}: sliced with constant bounds")
        else:
            ctx.unify(x[k], out[k], why)


@rule("aten::select")
def select(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = _norm_dim(node.args[1], len(x))
    ctx.freeze([x[dim]], f"{why}: select picks one index")
    for a, b in zip(x[:dim] + x[dim + 1:], out):
        ctx.unify(a, b, why)


@rule("aten::index_select")
def index_select(ctx: RuleContext, node: Node) -> None:
    x, out, why = ctx.dims(node.args[0]), ctx.dims(node), ctx.where(node)
    dim = _norm_dim(node.args[1], len(x))
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
    dim = _norm_dim(node.args[1], len(x))
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


# --- reductions and pooling --------------------------------------------------------------------

@rule("aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::var", "aten::std", "aten::prod",
      "aten::logsumexp", "aten::linalg_vector_norm", "aten::norm", "aten::any", "aten::all", "aten::max",
      "aten::min", "aten::argmax", "aten::argmin", "aten::var_mean")
def reduction(ctx: RuleContext, node: Node) -> None:
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    if len(out) == len(x):  # keepdim (or no reduction): kept dims line up
        for a, b in zip(x, out):
            if a.size == b.size:
                ctx.unify(a, b, why)
        return
    dims = next((a for a in node.args[1:] if isinstance(a, (list, tuple, int))), None)
    if dims is None:
        return  # full reduction to a scalar
    reduced = {_norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    for a, b in zip([d for k, d in enumerate(x) if k not in reduced], out):
        ctx.unify(a, b, why)


@rule("aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
      "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
      "aten::adaptive_max_pool2d", "aten::max_pool2d_with_indices", "aten::upsample_nearest2d",
      "aten::upsample_bilinear2d", "aten::_adaptive_avg_pool2d")
def pool(ctx: RuleContext, node: Node) -> None:
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    outs = [ctx.dims(node, k) for k in range(len(node.meta["val"]))] if ctx.is_multi(node) else [ctx.dims(node)]
    for out in outs:
        for a, b in zip(x[:-2] if len(x) > 2 else x[:1], out):
            ctx.unify(a, b, why)


# --- attention ---------------------------------------------------------------------------------

@rule("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
def sdpa(ctx: RuleContext, node: Node) -> None:
    q, k, v = (ctx.dims(a) for a in node.args[:3])
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    why = ctx.where(node)
    ctx.unify(q[-1], k[-1], why)
    ctx.freeze([q[-1], v[-1]], f"{why}: head_dim is kept (pruning keeps whole heads)")
    ctx.unify(k[-2], v[-2], why)
    ctx.unify(out[-1], v[-1], why)
    ctx.unify(out[-2], q[-2], why)
    if len(q) >= 3:
        hq, hk = q[-3], k[-3]
        ctx.unify(k[-3], v[-3], why)
        ctx.unify(out[-3], hq, why)
        if hq.size == hk.size:
            ctx.unify(hq, hk, why)
        elif hk.size != 1 and hq.size % hk.size == 0:  # enable_gqa: query heads = kv heads x group
            rep = ctx.new_space(hq.size // hk.size)
            ctx.freeze([rep], f"{why}: query heads within a key/value group")
            ctx.layout(hq, "prod", [hk, rep], why)
        broadcast(ctx, out[:-3], [q[:-3], k[:-3], v[:-3]], why)
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, Node) and ctx.has_dims(mask):
        scores = out[:-1] + [k[-2]]
        broadcast(ctx, scores, [ctx.dims(mask)], why)


# Ops that never carry channel dims through (asserts, size queries, RNG seeds): nothing to relate.
IGNORED = {"aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_size", "aten::sym_numel",
           "aten::sym_stride", "aten::_assert_async", "aten::scalar_tensor", "aten::arange", "aten::full",
           "aten::zeros", "aten::ones", "aten::empty", "aten::rand", "aten::randn", "aten::lift_fresh",
           "aten::_local_scalar_dense", "aten::item", "aten::new_ones", "aten::new_zeros", "aten::new_full",
           "aten::new_empty", "aten::new_tensor"}
