"""``quantize``'s per-layer knob for the goal search's per-layer plans (:mod:`graphopt.search.layerwise`).

A uniform choice (``quantize(scheme=int4,method=gptq)``) gives every layer one scheme; a plan gives each group of
layers that read one tensor (q/k/v, gate/up) its own, as the ``layers`` map. The search costs each layer's
schemes from the latency table on a round-to-nearest copy (:func:`layer_variant`: its speed does not depend on
how its codes were found) and estimates their loss from the rounding error (:func:`layer_error`) weighed by the
probed Gauss-Newton diagonal; the plan it picks is then built by GPTQ like any choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.infra.contract import PassResult
from graphopt.infra.program import Program

from .plan import LayerScheme, plan_layers, weight_matrix

Quantize = Any  # the pass (quantize.py imports this module)


def layer_value(q: Quantize) -> str | None:
    """The scheme ``q`` gives every layer, or None (a bits budget, a layers map, a part of the model, progressive)."""
    uniform = (q.budget_bits is None and not q.layers and q.group_size is None and q.activations is None
               and q.where == "*" and not q.progressive)
    return q.scheme if uniform else None


def layer_units(q: Quantize, program: Program) -> list[list[str]]:
    """``q``'s target layers in forward order, those that read one tensor together (GPTQ's groups)."""
    targets = q._targets(program.module, PassResult(modified=False))[0]
    return q._sequential_groups(program.analyses, targets) if targets else []


def layer_variant(q: Quantize, program: Program, name: str, value: str) -> nn.Module | None:
    """Layer ``name`` rounded to nearest under scheme ``value`` (``float``: the layer itself); None when the scheme
    does not apply to it (w8a8 on a convolution)."""
    module = program.get_submodule(name)
    if value == "float":
        return module
    scheme = LayerScheme.parse(value)
    if isinstance(module, nn.Conv2d) and scheme.scheme == "w8a8":
        return None
    weight = weight_matrix(module)
    if weight is None:
        return None
    plans, _ = plan_layers({name: tuple(weight[0].shape)}, {name: scheme}, q.uneven_groups)
    return q._packed(program, name, plans[name])


def layer_error(q: Quantize, program: Program, name: str, value: str) -> torch.Tensor | None:
    """The weight minus its rounded copy under ``value`` (rows: one per output, as ``weight_rows`` lays them out);
    None for w8a8, whose loss is mostly its rounded activations, which no weight change shows (the search measures
    the layer swapped instead: on MiniLM the weight errors alone put w8a8's loss in two layers, and the plan that
    kept those in float lost more than the floor allowed)."""
    weight = weight_matrix(program.get_submodule(name))
    if weight is None or LayerScheme.parse(value).scheme == "w8a8":
        return None
    if value == "float":
        return torch.zeros_like(weight[0], dtype=torch.float32)
    variant = layer_variant(q, program, name, value)
    if variant is None:
        return None
    rounded = variant.dequantized_weight(torch.float32).reshape(weight[0].shape)
    return weight[0].detach().float() - rounded
