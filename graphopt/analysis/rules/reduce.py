"""Rules for reductions and pooling."""

from __future__ import annotations

from torch.fx import Node

from .base import RuleContext, norm_dim, rule

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
    reduced = {norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
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
