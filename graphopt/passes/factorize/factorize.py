"""``factorize``: replace Linear layers by rank-``r`` pairs (:class:`graphopt.nn.lowrank.LowRankLinear`).

Chosen layers: every ``nn.Linear``, HuggingFace ``Conv1D`` and 1x1 ungrouped ``nn.Conv2d`` (a Linear over
channels at every position: :class:`graphopt.nn.lowrank.LowRankConv2d`; its calibration rows are its
input's positions) in ``where`` and not in ``skip``, except the
vocabulary projection (``lm_head=true`` takes it too, unless it is tied to the embedding table), layers whose
forward is not the plain one (subclasses, hooks: rebuilt from their weights they would lose what they add)
and non-float weights; each is skipped with its reason, as is every other convolution (a k x k or grouped
kernel is not one matrix over channels). ``method`` (:mod:`.decompose`): ``whiten`` (default;
optimal for the calibration inputs), ``asvd``, ``svd``. ``ratio`` is the share of the chosen layers' weights
removed, spread ``uniform`` (each layer its share), ``global`` or ``directions`` (:mod:`.allocate`), ranks
rounded down to ``rank_multiple``; or ``rank`` fixes every layer's rank. A rank saves weights only under the break-even
``in·out / (in + out)``: a ``rank`` at or above it for any layer is refused with that number.

The factors are ordinary Linear layers for the passes after it (``quantize`` packs both, ``heal`` trains them
with its ``factorize`` recipe). Not output-preserving: follow it with ``heal``.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import field
from typing import Annotated, Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.analysis.calibration import GramAccumulator, layer_input_stats
from graphopt.analysis.layers import (
    is_conv1d,
    linear_weight,
    output_embeddings,
    tied_tables,
    weight_rows,
    why_not_plain,
)
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass
from graphopt.nn.lowrank import LOW_RANK, LowRankConv2d, LowRankLinear, break_even_rank

from .allocate import (
    AllocationError,
    Shape,
    direction_ranks,
    global_ranks,
    removed_share,
    stored,
    uniform_ranks,
)
from .decompose import Spectrum, output_error, spectrum

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.2


@register_pass("factorize", tolerance=None, change="factorize", stage=50,
               choices=({"ratio": 0.1, "allocation": "global"}, {"ratio": 0.2, "allocation": "global"},
                        {"ratio": 0.3, "allocation": "global"}, {"ratio": 0.2}, {"ratio": 0.3},
                        {"ratio": 0.2, "allocation": "directions"}, {"ratio": 0.3, "allocation": "directions"}))
class Factorize(Pass):
    """Replace Linear layers by two smaller ones, ``W ≈ U·V``, ranks from a ratio of weights removed or given."""

    @property
    def decisive(self) -> tuple[str, ...]:  # type: ignore[override]  # the target in force, and the method
        return ("rank", "method") if self.rank is not None else ("ratio", "method", "allocation")

    ratio: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] | None = None  # share of the chosen layers' weights removed (None: 0.2, or rank=)
    rank: Annotated[int, Range(1)] | None = None  # every chosen layer at this rank (instead of ratio)
    method: Literal["whiten", "asvd", "svd"] = "whiten"  # whitened by the calibration Gram, activation-scaled, or plain SVD
    allocation: Literal["uniform", "global", "directions"] = "uniform"  # each layer its share of weights, ranks by truncation loss across layers, or each its share of directions
    rank_multiple: Annotated[int, Range(1)] = 8  # ranks rounded down to a multiple (8: measured faster, benchmarks/lowrank.py)
    where: str = "*"  # glob on the names of the layers factorized
    skip: list[str] = field(default_factory=list)  # globs of layer names left dense
    lm_head: bool = False  # factorize the vocabulary projection too (left dense by default)
    alpha: Annotated[float, Range(0, 1)] = 0.5  # asvd: the exponent of the input channel scale
    calib_batches: Annotated[int, Range(1)] = 32  # calibration batches read (whiten, asvd)

    @property
    def share(self) -> float:
        """The share of the chosen layers' weights to remove (``ratio``, 0.2 when neither it nor ``rank`` is set)."""
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method != "svd"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        self._check_options(program)
        targets = self._targets(program, result)
        if not targets:
            result.note("", "no layer was factorized (see the diagnostics for each one left alone)", "warning")
            return result
        weights = {n: _matrix(program.get_submodule(n)) for n in targets}
        shapes: dict[str, Shape] = {n: (int(w.shape[0]), int(w.shape[1])) for n, (w, _) in weights.items()}
        if self.rank is not None:
            self._check_rank(shapes)
        elif self.allocation != "global":
            self._ranks(shapes, {})  # raises before any calibration pass
        grams = self._grams(program, targets)
        for name in [n for n in targets if n in grams and grams[n][1] < shapes[n][1]]:
            rows = grams[name][1]
            result.skip(name, ("it never ran on the calibration data" if rows == 0 else
                               f"its calibration inputs are {rows} rows for {shapes[name][1]} input features") +
                        f": {self.method} would fit directions it never saw (give more calibration data, or "
                        "method=svd); it stays dense")
            targets.remove(name)
            del shapes[name]
        if not targets:
            result.note("", "no layer was factorized (see the diagnostics for each one left alone)", "warning")
            return result
        spectra = {n: spectrum(weights[n][0], self.method, *grams.get(n, (None, 0)), alpha=self.alpha)
                   for n in targets}
        ranks = self._ranks(shapes, spectra)
        for name in targets:
            weight, bias = weights[name]
            rank = ranks[name]
            if rank is None:
                result.skip(name, "left dense: " + (
                    "global allocation found its rank worth more than its weights" if self.allocation == "global"
                    else "at the share of directions every layer keeps, its pair would store more weights"))
                continue
            up, down = (t.to(weight.device) for t in spectra[name].factors(rank, weight.dtype))
            dense = program.get_submodule(name)
            layer = (LowRankConv2d.from_factors(up, down, bias, like=dense) if isinstance(dense, nn.Conv2d) else
                     LowRankLinear.from_factors(up, down, bias))
            program.replace_module(name, layer)
            result.note(name, self._describe(name, rank, shapes[name], spectra[name], weight, layer, grams))
        result.modified = any(r is not None for r in ranks.values())
        result.stats.update({"layers": sum(r is not None for r in ranks.values()),
                             "weights_before": sum(stored(None, s) for s in shapes.values()),
                             "weights_after": sum(stored(ranks[n], s) for n, s in shapes.items()),
                             "removed": round(removed_share(ranks, shapes), 4)})
        return result

    # --- options and scope ----------------------------------------------------------------------------
    def _check_options(self, program: Program) -> None:
        if self.rank is not None and self.ratio is not None:
            raise ValueError(f"factorize: give ratio= or rank=, not both (ratio={self.ratio:g}, rank={self.rank})")
        if self.rank is not None and self.allocation != "uniform":
            raise ValueError(f"factorize(allocation={self.allocation}) spends a ratio across layers; with rank= "
                             "every layer takes that rank (drop allocation or rank)")
        if program.device.type == "meta":
            raise ValueError("factorize needs real weights; the model is on the meta device (load its weights first)")

    def _targets(self, program: Program, result: PassResult) -> list[str]:
        model = program.module
        heads = output_embeddings(model)
        tied = set(tied_tables(model).values())
        factored = [n for n, m in model.named_modules() if isinstance(m, LOW_RANK)]
        targets, again = [], []
        for name, module in model.named_modules():
            found = _matrix(module)
            conv = isinstance(module, nn.Conv2d)
            if (found is None and not conv) or not name or not fnmatch.fnmatchcase(name, self.where):
                continue
            owner = name.rpartition(".")[0]
            if owner in factored:
                again.append(owner)
                continue
            why = _why_not_pointwise(module) if found is None else self._why_not(name, module, found[0], heads, tied)
            if why:
                result.skip(name, why)
            else:
                targets.append(name)
        if again:
            layers = sorted(set(again))
            raise ValueError(f"factorize: {len(layers)} layer(s) are factorized already ({', '.join(layers[:3])}"
                             f"{', ...' if len(layers) > 3 else ''}); factorizing a factor again saves less than a "
                             "lower rank would: run factorize once with the ratio you want, or skip them "
                             f"(skip=['{layers[0]}.*'])")
        return targets

    def _why_not(self, name: str, module: nn.Module, weight: torch.Tensor, heads: set[int], tied: set[str]) -> str:
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return "in skip"
        if id(module) in heads and not self.lm_head:
            return "the vocabulary projection (LM head) stays dense (lm_head=true factorizes it)"
        if id(module) in heads and name in tied:
            return ("the LM head is tied to the embedding table: factorizing it would untie them and store the "
                    "table and the factors (more weights than before), so it stays dense")
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}, not float (quantized already?)"
        base = type(module) if is_conv1d(module) else nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        return why_not_plain(module, base)

    def _check_rank(self, shapes: dict[str, Shape]) -> None:
        over = {n: break_even_rank(i, o) for n, (o, i) in shapes.items() if self.rank > break_even_rank(i, o)}
        if over:
            listed = ", ".join(f"{n} ({shapes[n][0]}x{shapes[n][1]}: break-even rank {r})"
                               for n, r in list(over.items())[:4])
            raise ValueError(f"factorize(rank={self.rank}) saves nothing on {len(over)} layer(s): a rank-r pair "
                             f"stores r·(in+out) weights, more than the dense in·out above the break-even rank: "
                             f"{listed}{', ...' if len(over) > 4 else ''}. Give a lower rank, or skip= them")

    # --- statistics and ranks -------------------------------------------------------------------------
    def _grams(self, program: Program, targets: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
        """Each layer's input Gram ``Σ xᵀx`` (float64, padding masked) and row count, for whiten / asvd."""
        if self.method == "svd":
            return {}
        batches = program.calib_batches(self.calib_batches)
        if not batches:
            raise ValueError(f"factorize(method={self.method}) reads calibration inputs; calib= is empty")
        stats = layer_input_stats(program.module, {n: program.get_submodule(n) for n in targets}, batches,
                                  GramAccumulator)
        return {n: (acc.gram, acc.rows) for n, acc in stats.items()}

    def _ranks(self, shapes: dict[str, Shape], spectra: dict[str, Spectrum]) -> dict[str, int | None]:
        if self.rank is not None:
            return dict.fromkeys(shapes, self.rank)
        try:
            if self.allocation == "global":
                return global_ranks(spectra, shapes, self.share, self.rank_multiple)
            if self.allocation == "directions":
                return direction_ranks(shapes, self.share, self.rank_multiple)
            return uniform_ranks(shapes, self.share, self.rank_multiple)
        except AllocationError as e:
            raise ValueError(str(e)) from None

    def _describe(self, name: str, rank: int, shape: Shape, spec: Spectrum, weight: torch.Tensor, layer: nn.Module,
                  grams: dict[str, tuple[torch.Tensor, int]]) -> str:
        text = (f"rank {rank} of {min(shape)}: {stored(None, shape):,} -> {stored(rank, shape):,} weights, "
                f"truncation loss {spec.relative_loss(rank):.4f}")
        if name in grams and self.method == "asvd":  # whiten's truncation loss is this error exactly (decompose.py)
            with torch.no_grad():
                approx = layer.dense_weight()
            text += f", output error {output_error(weight, approx, grams[name][0]):.4f} on calibration"
        return text


def _matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of a Linear, a Conv1D or a 1x1 ungrouped Conv2d, else ``None``."""
    if isinstance(module, nn.Conv2d):
        return (weight_rows(module, module.weight), module.bias) if not _why_not_pointwise(module) else None
    return linear_weight(module)


def _why_not_pointwise(conv: nn.Conv2d) -> str:
    """``""`` for a 1x1 ungrouped convolution, else why ``factorize`` leaves it alone."""
    kind = [f"{'x'.join(map(str, conv.kernel_size))} kernel"] if tuple(conv.kernel_size) != (1, 1) else []
    kind += [f"{conv.groups} groups"] if conv.groups != 1 else []
    if not kind:
        return ""
    return (f"a convolution with {' and '.join(kind)}: factorize takes 1x1 ungrouped convolutions (a k x k or "
            "grouped kernel is not one matrix over channels), so it stays as it is")
