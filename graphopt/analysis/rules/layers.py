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
    b = arg(node, 2, "bias")
    out, why = ctx.dims(node), ctx.where(node)
    packet = op_key(node.target)
    transposed = bool(node.args[6]) if packet in ("aten::convolution", "aten::_convolution") else False
    groups = node.args[8] if packet in ("aten::convolution", "aten::_convolution") else arg(node, 6, "groups", 1)
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
