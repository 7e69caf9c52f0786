"""Rules for reductions and pooling."""

from __future__ import annotations

from torch.fx import Node

from .base import RuleContext, arg, in_norm_layer, norm_dim, op_key, rule
from .pointwise import pointwise

# --- reductions and pooling --------------------------------------------------------------------

#: Reductions that are exact when dead (all-zero) units are removed: a zero adds nothing to a sum.
EXACT_UNDER_REMOVAL = {"aten::sum", "aten::nansum", "aten::any"}


@rule("aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::var", "aten::std", "aten::prod",
      "aten::logsumexp", "aten::linalg_vector_norm", "aten::norm", "aten::any", "aten::all", "aten::max",
      "aten::min", "aten::argmax", "aten::argmin", "aten::var_mean", "aten::std_mean", "aten::median",
      "aten::nanmean", "aten::nansum", "aten::mode")
def reduction(ctx: RuleContext, node: Node) -> None:
    """Kept dims pass through; reduced dims are frozen unless removing a dead unit leaves the result exact.

    A mean, variance, norm, max or log-sum-exp over a dim couples every unit of it: removing a unit
    changes the value the others see. Inside a normalisation layer (LayerNorm, RMSNorm look-alikes)
    the statistics are the layer's own, and pruning its width is the accepted, lossy, width prune.
    """
    if any(ctx.has_dims(a) for a in node.args[1:]):  # max(a, b), min(a, b): elementwise
        pointwise(ctx, node)
        return
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    out = ctx.dims(node, 0) if ctx.is_multi(node) else ctx.dims(node)
    dims = arg(node, 2 if op_key(node.target) in ("aten::linalg_vector_norm", "aten::norm") else 1, "dim")
    if not isinstance(dims, (int, list, tuple)) or isinstance(dims, bool) or (
            isinstance(dims, (list, tuple)) and not dims):
        reduced = set(range(len(x)))  # a full reduction
    else:
        reduced = {norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    if op_key(node.target) not in EXACT_UNDER_REMOVAL and not in_norm_layer(ctx, node):
        coupled = [x[k] for k in sorted(reduced) if x[k].size > 1]
        if coupled:
            ctx.couple(node, coupled, f"{op_key(node.target).split('::')[-1]} over this dim")
    if len(out) == len(x):  # keepdim: kept dims line up
        for k, (a, b) in enumerate(zip(x, out)):
            if k not in reduced and a.size == b.size:
                ctx.unify(a, b, why)
        return
    for a, b in zip([d for k, d in enumerate(x) if k not in reduced], out):
        ctx.unify(a, b, why)


@rule("aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
      "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
      "aten::adaptive_max_pool1d", "aten::adaptive_max_pool2d", "aten::max_pool2d_with_indices",
      "aten::upsample_nearest1d", "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::upsample_linear1d",
      "aten::_adaptive_avg_pool2d", "aten::max_pool1d_with_indices", "aten::max_pool3d_with_indices")
def pool(ctx: RuleContext, node: Node) -> None:
    """Leading (batch, channel) dims pass through; the 1-3 trailing spatial dims are frozen."""
    x, why = ctx.dims(node.args[0]), ctx.where(node)
    outs = [ctx.dims(node, k) for k in range(len(node.meta["val"]))] if ctx.is_multi(node) else [ctx.dims(node)]
    name = op_key(node.target)
    spatial = next((k for k in (1, 2, 3) if f"{k}d" in name), 2)
    lead = max(len(x) - spatial, 0)
    ctx.freeze(x[lead:], f"{why}: spatial dim")
    for out in outs:
        ctx.freeze(out[lead:], f"{why}: spatial dim")
        for a, b in zip(x[:lead], out[:lead]):
            ctx.unify(a, b, why)
