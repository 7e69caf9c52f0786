"""The quantize pass's algorithms behind one interface: SmoothQuant, round to nearest and GPTQ.

An algorithm decides for one :class:`LayerGroup` (layers that read one tensor: q, k and v of an attention)
from one statistic of each layer's calibration inputs, which it names (:meth:`QuantAlgorithm.statistic`:
none, per-channel maxima, a Gram matrix). ``sequential`` algorithms read that statistic on the model as
quantized so far, group by group in forward order (GPTQ); the others read it on the float model in one
run over the calibration batches. An algorithm either transforms the group (SmoothQuant: an input
multiplier, folded into the weights) or rounds it (RTN, GPTQ: codes and scales per layer); the pass runs
at most one transform and then one rounding, and builds the quantized layers from what they chose.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from graphopt.analysis.calibration import GramAccumulator
from graphopt.analysis.diagnostics import Diagnostic
from graphopt.analysis.distributed import computed_by_owners
from graphopt.nn.quant import W8A8_QMAX, quantize_weight

from .gptq import gptq_quantize
from .plan import LayerPlan
from .smoothquant import SmoothStats, choose_alpha

Codes = tuple[torch.Tensor, torch.Tensor]  # int8 codes [out, in], float32 scales [out, groups]


@dataclass
class LayerGroup:
    """Layers that read one tensor, as an algorithm sees them."""

    names: list[str]
    weights: list[torch.Tensor]  # [out, in], float
    plans: list[LayerPlan]
    stats: list[Any]  # the algorithm's statistic of each layer's inputs (None where it asks for none)
    smooth: list[torch.Tensor | None] = field(default_factory=list)  # input multipliers: the layers hold W / smooth
    codes: list[Codes | None] = field(default_factory=list)  # what a rounding chose

    def __post_init__(self) -> None:
        self.smooth = self.smooth or [None] * len(self.names)
        self.codes = self.codes or [None] * len(self.names)

    @property
    def label(self) -> str:
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]} (+{len(self.names) - 1})"


def qmax_of(plan: LayerPlan) -> int | None:
    """w8a8 layers round their weights to 7 bits (:data:`W8A8_QMAX`); the others use the scheme's range."""
    return W8A8_QMAX if plan.activations != "none" else None


def held_weight(weight: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """The weight the quantized layer holds: ``W / smooth`` when its input is multiplied by ``smooth``."""
    return weight if smooth is None else weight / smooth.to(weight.dtype)


class QuantAlgorithm(ABC):
    """One step of weight quantization over groups of layers (see the module docstring)."""

    name: ClassVar[str]
    sequential: ClassVar[bool] = False  # its statistic is read on the partly quantized model, group by group

    def statistic(self, features: int) -> Any | None:
        """A fresh accumulator for one layer's inputs (``add(x, mask)``), or None when it reads no data."""
        return None

    @abstractmethod
    def apply(self, group: LayerGroup) -> list[Diagnostic]:
        """Decide for ``group`` (set ``group.smooth`` or ``group.codes``); return what the user should know."""


@dataclass(frozen=True)
class SmoothQuant(QuantAlgorithm):
    """Migrate activation outliers into w8a8 weights (:mod:`.smoothquant`); ``alpha=None`` chooses per group."""

    alpha: float | None = None
    name: ClassVar[str] = "smoothquant"

    def statistic(self, features: int) -> SmoothStats:
        # the first batches whole serve only to choose alpha
        return SmoothStats(features) if self.alpha is None else SmoothStats(features, keep_rows=0)

    def apply(self, group: LayerGroup) -> list[Diagnostic]:
        _, s, why = choose_alpha(group.stats[0], group.weights, self.alpha, group.plans[0].activations)
        if s is not None:
            group.smooth = [(1.0 / s).to(device=w.device, dtype=w.dtype) for w in group.weights]
        return [Diagnostic(group.label, f"SmoothQuant: {why}", "info")]


@dataclass(frozen=True)
class RoundToNearest(QuantAlgorithm):
    """Each weight rounded to its nearest code (scales: :func:`graphopt.nn.quant.weight_scales`)."""

    name: ClassVar[str] = "rtn"

    def apply(self, group: LayerGroup) -> list[Diagnostic]:
        group.codes = [quantize_weight(held_weight(w, s), p.scheme, p.group_size, qmax_of(p))
                       for w, p, s in zip(group.weights, group.plans, group.smooth)]
        return []


@dataclass(frozen=True)
class Gptq(QuantAlgorithm):
    """Hessian-aware rounding (:mod:`.gptq`) on the inputs the already-quantized layers produce."""

    damp: float = 0.01
    act_order: bool = True
    name: ClassVar[str] = "gptq"
    sequential: ClassVar[bool] = True

    def statistic(self, features: int) -> GramAccumulator:
        return GramAccumulator(features)

    def apply(self, group: LayerGroup) -> list[Diagnostic]:
        """Each layer of the group rounded with its Hessian; under ``torch.distributed`` the group's layers are
        shared out over the processes (the costliest first: ``in² x out``) and their codes sent to all."""
        notes = []
        for name, gram in zip(group.names, group.stats):
            dead = int((torch.diagonal(gram.gram) == 0).sum())
            if dead:
                notes.append(Diagnostic(name, f"{dead} input feature(s) were zero in every calibration batch: their "
                                              "weight columns are rounded to nearest (GPTQ has no data for them)",
                                        "warning"))

        def solve(i: int) -> Codes:
            w, plan, gram, s = group.weights[i], group.plans[i], group.stats[i], group.smooth[i]
            hessian = gram.mean(spend=True)  # the solve overwrites it: one k x k matrix in all
            if s is not None:  # the layer sees x * s: its Hessian is s H s
                hessian.mul_(s.double()[:, None]).mul_(s.double()[None, :])
            return gptq_quantize(held_weight(w, s), hessian, plan.scheme, plan.group_size, damp=self.damp,
                                 act_order=self.act_order, qmax=qmax_of(plan), overwrite=True)

        group.codes = computed_by_owners([w.shape[1] ** 2 * w.shape[0] for w in group.weights], solve)
        return notes


def rounding(method: str, *, damp: float, act_order: bool) -> QuantAlgorithm:
    """The rounding algorithm named by quantize's ``method``."""
    roundings: dict[str, Callable[[], QuantAlgorithm]] = {
        "rtn": RoundToNearest, "gptq": functools.partial(Gptq, damp, act_order)}
    if method not in roundings:
        raise ValueError(f"quantize(method={method!r}): choose from {', '.join(roundings)}")
    return roundings[method]()
