"""What each layer of a ``quantize`` pass becomes: scheme, group size, activations; mixed precision.

:func:`plan_layers` gives every target layer its :class:`LayerPlan` from the pass options, handling
group sizes that do not divide a layer's input width (``uneven_groups``). :func:`mixed_precision`
keeps the most sensitive layers at int8 so that the average bits per weight meet a budget. A layer's
sensitivity is the relative output error of the whole model with that layer alone rounded to the low
scheme: estimated by default from one probed backward pass per calibration batch
(:func:`gradient_sensitivity`: each layer's rounding error weighed by the diagonal of the output's
Gauss-Newton matrix), or measured (:func:`layer_sensitivity`: a forward of the model per layer, as in
"Layer-Wise Quantization", Dumitru et al., 2024; about 15 minutes for SmolLM2's 210 layers on 2 cores,
against 15 s for the estimate, which picks a plan of the same quality there). Layers are promoted
greedily by sensitivity per extra bit until the budget is spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphopt.analysis.layers import linear_weight, weight_rows
from graphopt.analysis.probes import fisher_diagonal
from graphopt.infra.metrics import output_changes
from graphopt.nn.quant import BITS, n_groups

log = logging.getLogger(__name__)


def weight_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight as [out, in], bias)`` of a layer quantize packs: a Linear or Conv1D, or a Conv2d (its weight as
    rows of ``in / groups x kh x kw``, the layout of :class:`QuantConv2d`); else ``None``."""
    if isinstance(module, nn.Conv2d):
        return weight_rows(module, module.weight), module.bias
    return linear_weight(module)


@dataclass(frozen=True)
class LayerPlan:
    scheme: str  # int8 | int4 | ternary (w8a8: int8 with activations="per_tensor" or "per_token")
    group_size: int
    activations: str = "none"

    def bits(self, out_features: int, in_features: int) -> float:
        """Average stored bits per weight, codes and float32 scales."""
        return BITS[self.scheme] + 32 * n_groups(in_features, self.group_size) / in_features


#: what quantize's ``layers`` map may give a layer (``float``: left in float)
LAYER_SCHEMES = ("int8", "int4", "ternary", "w8a8", "float")
W8A8_MODES = ("per_tensor", "per_token")


@dataclass(frozen=True)
class LayerScheme:
    """What a user asks for a layer, as written in quantize's ``layers`` map: ``int4``, ``int4/g64``,
    ``int8/g0`` (one scale per row), ``w8a8/per_token``, ``float``. Unset parts take the pass's defaults;
    :func:`plan_layers` turns it into each layer's :class:`LayerPlan`."""

    scheme: str
    group_size: int | None = None  # None: the scheme's default for each layer's width
    activations: str | None = None  # w8a8 only; None: per_tensor

    @classmethod
    def parse(cls, text: str) -> LayerScheme:
        scheme, *parts = str(text).split("/")
        usage = (f"layer scheme {text!r}: write <scheme>[/g<group size>][/<activations>] with a scheme of "
                 f"{', '.join(LAYER_SCHEMES)} (e.g. int4/g64, int8/g0, w8a8/per_token, float)")
        if scheme not in LAYER_SCHEMES or len(parts) > 2:
            raise ValueError(usage)
        group, acts = None, None
        for part in parts:
            if part.startswith("g") and part[1:].isdigit() and group is None and scheme not in ("float", "w8a8"):
                group = int(part[1:])
            elif part in W8A8_MODES and acts is None and scheme == "w8a8":
                acts = part
            else:
                raise ValueError(usage)
        return cls(scheme, group, acts)

    def __str__(self) -> str:
        return "/".join([self.scheme, *([f"g{self.group_size}"] if self.group_size is not None else []),
                         *([self.activations] if self.activations else [])])


def default_group_size(scheme: str) -> int:
    """int4: groups of 128 (per-channel int4 loses too much); int8, w8a8, ternary: one scale per row."""
    return 128 if scheme == "int4" else 0


#: int4 with group_size unset: the largest of these that divides a layer's input width (else one scale per row)
DEFAULT_INT4_GROUPS = (128, 64, 32)


def _default_groups(shapes: dict[str, tuple[int, int]], scheme: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Each layer's group size when the user gave none, and a note for each layer that does not get the first."""
    if scheme != "int4":
        return {name: default_group_size(scheme) for name in shapes}, []
    groups, notes = {}, []
    for name, (_, k) in shapes.items():
        groups[name] = next((g for g in DEFAULT_INT4_GROUPS if k % g == 0), 0)
        if groups[name] != DEFAULT_INT4_GROUPS[0]:
            got = f"groups of {groups[name]}" if groups[name] else "one scale per row"
            notes.append((name, f"input width {k} is not a multiple of {DEFAULT_INT4_GROUPS[0]}: {got} (the default "
                                f"takes the largest of {', '.join(map(str, DEFAULT_INT4_GROUPS))} that divides it; "
                                "group_size= sets one for every layer)"))
    return groups, notes


def plan_layers(shapes: dict[str, tuple[int, int]], chosen: dict[str, LayerScheme], uneven: str
                ) -> tuple[dict[str, LayerPlan], list[tuple[str, str]]]:
    """``{name: LayerPlan}`` for layers of ``shapes`` (``name: (out, in)``) from what each was given
    (``chosen``, none of them ``float``), and notes ``(name, message)``.

    Raises ValueError when a group size does not divide a layer's input width and ``uneven="error"``.
    """
    plans: dict[str, LayerPlan] = {}
    notes: list[tuple[str, str]] = []
    for want in dict.fromkeys(chosen.values()):
        subset = {n: s for n, s in shapes.items() if chosen[n] == want}
        got, said = _plan_same(subset, want.scheme, want.group_size, uneven, want.activations or "per_tensor")
        plans.update(got)
        notes += said
    return {n: plans[n] for n in shapes}, notes


def _plan_same(shapes: dict[str, tuple[int, int]], scheme: str, group_size: int | None, uneven: str,
               activations: str) -> tuple[dict[str, LayerPlan], list[tuple[str, str]]]:
    """:func:`plan_layers` for layers that were all given the same scheme."""
    acts = activations if scheme == "w8a8" else "none"
    base = "int8" if scheme == "w8a8" else scheme
    if group_size is None:  # a group size that divides every layer (quantize composes with what prune left)
        groups, notes = _default_groups(shapes, base)
        return {name: LayerPlan(base, groups[name], acts) for name in shapes}, notes
    group = group_size
    if acts != "none" and group > 0:
        raise ValueError(f"quantize(scheme=w8a8, group_size={group}): w8a8 runs on integer kernels with one "
                         "weight scale per output channel; leave group_size unset (or 0)")
    plans: dict[str, LayerPlan] = {}
    notes: list[tuple[str, str]] = []
    uneven_layers = [n for n, (_, k) in shapes.items() if group > 0 and k % group]
    if uneven_layers and uneven == "error":
        n = uneven_layers[0]
        fits = [g for g in range(group - 1, 7, -1) if all(k % g == 0 for _, k in shapes.values())]
        divides = f"group_size={fits[0]} does" if fits else f"no size from 8 to {group} does"
        raise ValueError(
            f"quantize(group_size={group}): {len(uneven_layers)} of {len(shapes)} layers have an input width that "
            f"is not a multiple of {group} (e.g. {n!r} with {shapes[n][1]}). Pass uneven_groups=short (a shorter "
            "last group: graphopt and ONNX run it; compressed-tensors checkpoints do not) or "
            "uneven_groups=per_channel (one scale per row for those layers), or choose a group size that divides "
            f"every input width ({divides})")
    for name in shapes:
        if name in uneven_layers:
            if uneven == "per_channel":
                plans[name] = LayerPlan(base, 0, acts)
                notes.append((name, f"input width {shapes[name][1]} is not a multiple of {group}: "
                                    "one scale per row (uneven_groups=per_channel)"))
                continue
            notes.append((name, f"input width {shapes[name][1]} is not a multiple of {group}: a shorter last "
                                "group (uneven_groups=short)"))
        plans[name] = LayerPlan(base, group, acts)
    return plans, notes


def layer_sensitivity(model: nn.Module, names: list[str], packed: Callable[[str, LayerPlan], nn.Module],
                      plans: dict[str, LayerPlan], batches: list) -> dict[str, float]:
    """Relative output error of ``model`` on ``batches`` with each layer of ``names`` alone replaced by
    ``packed(name, plan)`` (the layer quantized by its plan)."""
    swaps = {name: (lambda name=name: {name: packed(name, plans[name])}) for name in names}
    return output_changes(model, swaps, batches, "quantize: sensitivity of each layer")


def gradient_sensitivity(model: nn.Module, params: dict[str, torch.Tensor], error: Callable[[str], torch.Tensor],
                         rows: Callable[[str, torch.Tensor], torch.Tensor], batches: list) -> dict[str, float]:
    """:func:`layer_sensitivity`'s figure estimated to second order from one probed backward pass per batch.

    ``params``: each layer's weight as its module holds it; ``error(name)``: its rounding error (the weight minus
    the dequantized one) laid out as ``rows(name, t)`` lays out a tensor shaped like the weight, asked for one
    layer at a time after the backward passes. The score of a layer is ``Σ diag(JᵀJ) ⊙ Δw² / Σ|f|²`` over the
    batches (:mod:`graphopt.analysis.probes`): the squared output change its rounding causes alone, relative to
    the outputs' energy, with the Gauss-Newton matrix taken diagonal as in HAWQ-V2's and ModelOpt's per-layer
    scores."""
    fisher, energy = fisher_diagonal(model, params, batches, who="quantize(budget_bits=...)")
    return {n: float((rows(n, fisher.pop(n)) * error(n).float().pow(2)).sum()) / (energy or 1.0) for n in params}


def mixed_precision(plans: dict[str, LayerPlan], shapes: dict[str, tuple[int, int]], scores: dict[str, float],
                    budget_bits: float) -> tuple[dict[str, LayerPlan], float]:
    """Promote the most sensitive layers to int8 per channel while the average bits stay within budget.

    Returns the new plans and the average bits per weight reached.
    """
    high = LayerPlan("int8", 0)
    sizes = {n: shapes[n][0] * shapes[n][1] for n in plans}
    total = sum(sizes.values())
    bits = {n: plans[n].bits(*shapes[n]) for n in plans}
    floor = sum(bits[n] * sizes[n] for n in plans) / total
    if budget_bits < floor - 1e-9:
        raise ValueError(f"quantize(budget_bits={budget_bits}): the low scheme alone needs {floor:.3f} bits per "
                         "weight (codes and scales); give a budget of at least that")
    spent = floor * total
    chosen = dict(plans)

    def gain(n: str) -> float:  # error removed per extra bit spent
        return scores[n] / max((high.bits(*shapes[n]) - bits[n]) * sizes[n], 1e-9)

    for name in sorted(plans, key=gain, reverse=True):
        extra = (high.bits(*shapes[name]) - bits[name]) * sizes[name]
        if extra > 0 and spent + extra <= budget_bits * total + 1e-6:
            chosen[name] = high
            spent += extra
    return chosen, spent / total
