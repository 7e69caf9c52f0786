"""Fold eval-mode BatchNorm into the Conv/Linear that feeds it (exact up to float rounding).

In eval mode ``bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta`` is a per-channel affine map,
so when ``y`` is the output of a conv or linear layer used by nothing else, the map can be moved
into that layer's weight and bias (``w' = w * s`` along the output channels, ``b' = (b - mean) * s +
beta`` with ``s = gamma / sqrt(var + eps)``) and the BatchNorm replaced by ``nn.Identity``
(Ioffe & Szegedy 2015; Jacob et al. 2018, "Quantization and Training of Integer-Arithmetic-Only
Inference", section 3.2).

Pairs are found in the exported graph, not from module order: a BatchNorm call folds only if its
input is produced by a conv/linear op whose weight (and bias) are parameters of an ``nn.Conv*``,
``nn.ConvTranspose*`` or ``nn.Linear`` module that is called once and whose output feeds nothing
else. Every BatchNorm left in place gets a diagnostic that says why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Node

from graphopt.analysis import AnalysisManager
from graphopt.frontend.aten import NotALayerCall, conv_args, is_identity, op_name, op_packet, tensor_names
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass

log = logging.getLogger(__name__)

aten = torch.ops.aten

# BatchNorm ops as torch.export writes them -> index of the ``training`` flag (None: always eval).
_BN_OPS: dict[Any, int | None] = {aten.batch_norm: 5, aten._native_batch_norm_legit_no_training: None}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_STOCK_FORWARDS = {c.forward for c in (*_CONVS, *_CONV_TS, nn.Linear)}
_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


class _Skip(Exception):
    """A BatchNorm call cannot be folded; the message says why."""


@dataclass
class _Fold:
    """One BatchNorm call and the layer it folds into."""

    bn_node: Node
    layer: str  # FQN of the conv/linear module
    kind: str  # "conv" | "conv_t" | "linear"


def _owner(fqn: str) -> str:
    return fqn.rpartition(".")[0]


def _bn_module_name(node: Node, names: dict[str, str], modules: dict[str, nn.Module]) -> str | None:
    """The BatchNorm module a batch_norm node belongs to: via the tensors it reads, else the module stack."""
    for arg in node.args[1:5]:
        if isinstance(arg, Node) and arg.name in names:
            return _owner(names[arg.name])
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        if path in modules:
            return path
    return None


def _find_layer(bn_node: Node, names: dict[str, str], modules: dict[str, nn.Module]) -> _Fold:
    """The conv/linear layer whose output this batch_norm node normalises, or raise _Skip(why)."""
    src = bn_node.args[0]
    while is_identity(src) and len(src.users) == 1:
        src = src.args[0]
    if not isinstance(src, Node):
        raise _Skip("input is not a tensor produced by the graph")
    try:
        found = conv_args(src) if src.op == "call_function" else None
    except NotALayerCall as why:
        raise _Skip(str(why)) from None
    if found is None:
        raise _Skip(f"input comes from {op_name(src)}, not a conv/linear")
    kind, weight, bias = found
    if len(src.users) > 1:
        others = ", ".join(sorted(u.name for u in src.users if u is not bn_node))
        raise _Skip(f"the {op_name(src)} output is also used by {others}")
    if not (isinstance(weight, Node) and weight.name in names):
        raise _Skip(f"the weight of {op_name(src)} is computed in forward (a parametrization?), not a parameter")
    weight_fqn = names[weight.name]
    layer = _owner(weight_fqn)
    module = modules.get(layer)
    expected = {"conv": _CONVS, "conv_t": _CONV_TS, "linear": (nn.Linear,)}[kind]
    if not isinstance(module, expected) or weight_fqn.rpartition(".")[2] != "weight":
        raise _Skip(f"input comes from {op_name(src)} on {weight_fqn!r}, which is not the weight of an "
                    f"{'/'.join(c.__name__ for c in expected)}")
    if len(weight.users) != 1:
        raise _Skip(f"{layer!r} ({type(module).__name__}) is used {len(weight.users)} times in the graph; "
                    f"folding would change its other uses")
    if module.bias is None:
        if bias is not None:
            raise _Skip(f"{layer!r} has no bias but its op is given one in forward")
        if type(module).forward not in _STOCK_FORWARDS:
            raise _Skip(f"{layer!r} has no bias and a custom forward ({type(module).__name__}); "
                        f"cannot add one")
    elif not (isinstance(bias, Node) and names.get(bias.name) == f"{layer}.bias" and len(bias.users) == 1):
        raise _Skip(f"the bias of {layer!r} is shared or not passed to its op as-is")
    out_val, w_val = src.meta.get("val"), weight.meta.get("val")
    if out_val is not None and w_val is not None:
        want = 2 if kind == "linear" else w_val.dim()
        if out_val.dim() != want:
            raise _Skip(f"the {op_name(src)} output has {out_val.dim()} dims, so BatchNorm's channel dim 1 "
                        f"is not {layer!r}'s output-feature dim")
    return _Fold(bn_node, layer, kind)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 such that eval-mode ``bn(y) = y * scale + shift`` per channel."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def folded_weights(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                   *, kind: str, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``y * scale + shift`` with ``y`` the layer's output (computed in float64).

    Output channels are dim 0 of conv/linear weights (grouped and depthwise convs included) and dim 1
    of a transposed conv's ``(in, out / groups, *k)`` weight, per group.
    """
    w = weight.detach().double()
    if kind == "conv_t":
        k = w.shape[2:]
        per_group = w.view(groups, w.shape[0] // groups, w.shape[1], *k)
        new_w = (per_group * scale.view(groups, 1, w.shape[1], *([1] * len(k)))).view_as(w)
    else:
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    b = torch.zeros_like(scale) if bias is None else bias.detach().double()
    new_b = b * scale + shift
    return new_w.to(weight.dtype), new_b.to(weight.dtype if bias is None else bias.dtype)


@register_pass("fold_bn")
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm1d/2d/3d into the preceding Conv/ConvTranspose/Linear (exact)."""

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        if program.module.training:
            raise ValueError("fold_bn needs the model in eval mode (BatchNorm uses batch statistics in "
                             "training mode): call model.eval() first; optimize() does this on its copy")
        result = PassResult(modified=False)
        all_names: dict[int, list[str]] = defaultdict(list)  # a module registered under several names
        for name, m in program.module.named_modules(remove_duplicate=False):
            all_names[id(m)].append(name)
        modules = dict(program.named_modules())
        bns = {n: m for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if not bns:
            result.stats.update(folded=0, skipped=0)
            result.note("", "no BatchNorm layers in the model: nothing to fold")
            return result
        ep = am.get("exported")
        names = tensor_names(ep)
        calls: dict[str, list[Node]] = defaultdict(list)
        for node in ep.graph.nodes:
            if node.op == "call_function" and op_packet(node) in _BN_OPS:
                bn_name = _bn_module_name(node, names, modules)
                if bn_name in bns:
                    calls[bn_name].append(node)
        folded = 0
        for bn_name, bn in bns.items():
            try:
                folds = self._plan(bn_name, bn, calls.get(bn_name, []), names, modules)
            except _Skip as why:
                result.skip(bn_name, str(why))
                continue
            self._apply(program, bn_name, bn, folds, all_names[id(bn)])
            folded += 1
        result.modified = folded > 0
        result.stats.update(folded=folded, skipped=len(bns) - folded)
        log.info("fold_bn: folded %d of %d BatchNorm modules", folded, len(bns))
        return result

    @staticmethod
    def _plan(bn_name: str, bn: nn.modules.batchnorm._BatchNorm, nodes: list[Node], names: dict[str, str],
              modules: dict[str, nn.Module]) -> list[_Fold]:
        if not nodes:
            raise _Skip("not called on the example inputs (no batch_norm op in the captured graph)")
        if type(bn).forward not in _BN_FORWARDS:
            raise _Skip(f"{type(bn).__name__} has a custom forward; replacing it could drop more than BatchNorm")
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise _Skip("uses batch statistics (track_running_stats=False), which no weight can absorb")
        if bn.training:
            raise _Skip("in training mode (batch statistics); call .eval() on it")
        folds = []
        for i, node in enumerate(nodes):
            flag = _BN_OPS[op_packet(node)]
            if flag is not None and len(node.args) > flag and node.args[flag]:
                raise _Skip("uses batch statistics in the captured graph (training-mode statistics)")
            try:
                folds.append(_find_layer(node, names, modules))
            except _Skip as why:
                prefix = f"call {i + 1} of {len(nodes)}: " if len(nodes) > 1 else ""
                raise _Skip(prefix + str(why)) from None
        layers = [f.layer for f in folds]
        if len(set(layers)) != len(layers):
            raise _Skip(f"its calls fold into the same layer more than once ({', '.join(layers)})")
        return folds

    @staticmethod
    def _apply(program: Program, bn_name: str, bn: nn.modules.batchnorm._BatchNorm, folds: list[_Fold],
               aliases: list[str]) -> None:
        scale, shift = _bn_affine(bn)
        for fold in folds:
            layer = program.get_submodule(fold.layer)
            groups = layer.groups if fold.kind == "conv_t" else 1
            weight, bias = folded_weights(layer.weight, layer.bias, scale.to(layer.weight.device),
                                          shift.to(layer.weight.device), kind=fold.kind, groups=groups)
            program.set_tensor(f"{fold.layer}.weight", weight)
            program.set_tensor(f"{fold.layer}.bias", bias, requires_grad=layer.weight.requires_grad)
            log.debug("fold_bn: %s -> %s", bn_name, fold.layer)
        for name in aliases or [bn_name]:
            program.replace_module(name, nn.Identity())
