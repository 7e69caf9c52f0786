"""Rules for ops with weights and attention: linear/matmul, conv, norms, embedding, SDPA."""

from __future__ import annotations

from torch.fx import Node

from .base import RuleContext, arg, broadcast, op_key, rule

# --- linear algebra ----------------------------------------------------------------------------

@rule("aten::linear")
def linear(ctx: RuleContext, node: Node) -> None:
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    b = arg(node, 2, "bias")
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
    if not (_reads_weight(ctx, node.args[0]) or _reads_weight(ctx, node.args[1])) and a[-1].size > 1:
        # two activations contracted (attention scores q @ k^T): the scale written next to it reads
        # this width (1 / sqrt(head_dim)), so it is kept whole, as for scaled_dot_product_attention
        ctx.freeze([a[-1]], f"{why}: dim contracted between two activations (head_dim is kept; whole "
                   f"heads are pruned)")


_VIEWS = {"aten::t", "aten::transpose", "aten::permute", "aten::view", "aten::reshape", "aten::expand",
          "aten::unsqueeze", "aten::squeeze", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous",
          "aten::mT", "aten::numpy_T", "aten::alias", "aten::detach"}


def _reads_weight(ctx: RuleContext, node: object) -> bool:
    """True if ``node`` is a parameter/buffer, possibly through views, copies and casts."""
    for _ in range(16):
        if not isinstance(node, Node):
            return False
        if node.op == "placeholder":
            return node.name in ctx.weights
        if node.op != "call_function" or op_key(node.target) not in _VIEWS:
            return False
        node = node.args[0]
    return False


@rule("aten::baddbmm", "aten::addbmm")
def baddbmm(ctx: RuleContext, node: Node) -> None:
    base, a, b = (ctx.dims(x) for x in node.args[:3])
    out, why = ctx.dims(node), ctx.where(node)
    ctx.unify(a[-1], b[-2], why)
    ctx.unify(out[-2], a[-2], why)
    ctx.unify(out[-1], b[-1], why)
    broadcast(ctx, out[:-2], [a[:-2], b[:-2]], why)
    broadcast(ctx, out, [base], why)


_CONV_TRANSPOSE = ("aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d")


def _conv_layout(node: Node) -> tuple[bool, int]:
    """(transposed, groups) of any aten convolution overload."""
    packet = op_key(node.target)
    if packet in ("aten::convolution", "aten::_convolution"):
        return bool(node.args[6]), int(node.args[8])
    return packet in _CONV_TRANSPOSE, int(arg(node, 6, "groups", 1))


@rule("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution", *_CONV_TRANSPOSE)
def conv(ctx: RuleContext, node: Node) -> None:
    """Channels couple through the weight; spatial dims and the kernel window are never pruned.

    Weights are ``[out, in / groups, *k]`` (transposed: ``[in, out / groups, *k]``); with groups, the
    channels are groups x channels-per-group and pruning removes whole groups.
    """
    x, w = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    b = arg(node, 2, "bias")
    out, why = ctx.dims(node), ctx.where(node)
    transposed, groups = _conv_layout(node)
    ctx.unify(out[0], x[0], why)
    ctx.freeze(w[2:], f"{why}: kernel window")
    ctx.freeze(x[2:] + out[2:], f"{why}: spatial dim")
    # the weight dims that index input channels (whole, or within a group) and output channels
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    if groups == 1:
        ctx.unify(x[1], w_in, why)
        ctx.unify(out[1], w_out, why)
    else:  # channels = groups x channels-per-group; pruning keeps whole groups
        g = ctx.new_space(groups)
        within = f"{why}: channels within a conv group (whole groups are pruned)"
        if transposed:  # w[0] holds all input channels, w[1] the outputs of one group
            per_group_in = ctx.new_space(w[0].size // groups)
            ctx.freeze([per_group_in, w[1]], within)
            ctx.layout(w[0], "prod", [g, per_group_in], why)
            ctx.unify(x[1], w[0], why)
            ctx.layout(out[1], "prod", [g, w[1]], why)
        else:
            per_group_out = ctx.new_space(w[0].size // groups)
            ctx.freeze([w[1], per_group_out], within)
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
        p = arg(node, idx, "weight" if idx == 2 else "bias")
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
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, Node) and ctx.has_dims(mask):
        scores = out[:-1] + [k[-2]]
        broadcast(ctx, scores, [ctx.dims(mask)], why)
