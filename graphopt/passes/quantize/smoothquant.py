"""SmoothQuant for w8a8: migrate activation outliers into the weights (Xiao et al. 2023, "SmoothQuant").

A layer ``y = x Wᵀ`` becomes ``y = (x / s)(W · s)ᵀ`` with ``s_j = max|x_j|^α / max|W_:,j|^(1-α)``:
the input's outlier channels shrink, the weight's columns grow, and both quantize with less error.
Layers that read the same tensor (q, k, v) share one ``s`` (their largest weights), so the exported
graph scales and quantizes that tensor once.

``alpha=None`` ("auto") chooses per group of layers from a grid, by the layers' own output error
under w8a8 on calibration inputs; no smoothing (no extra ``Mul`` at run time) unless smoothing
lowers that error by at least :data:`MIN_GAIN`, or by :data:`WIDE_MIN_GAIN` for layers whose input
is wider than their outputs (FFN down projections): there the ``Mul`` scales the block's largest
activation. On all-MiniLM-L6-v2, smoothing its six down projections cost 3-4% of the w8a8 ONNX
latency for +0.002 embedding cosine (their layer errors dropped 2-5x); a model with massive
outliers there (a 5x or larger drop) still gets them smoothed. A factor that an earlier layer's
per-channel scales carry exactly (attention's value projection for the output projection, the up
projection for a gated MLP's down projection) is moved there, and its ``Mul`` disappears: the quantize
pass proves the fold on the graph (:mod:`graphopt.analysis.channel_scale`), it does not try it on data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from graphopt.analysis.channel_scale import producers_of, scale_path
from graphopt.frontend.errors import CaptureError
from graphopt.kernels.quant import quant_linear_reference
from graphopt.nn.quant import W8A8_QMAX, pack, quantize_weight

if TYPE_CHECKING:
    from graphopt.analysis import AnalysisManager
    from graphopt.infra.contract import PassResult
    from graphopt.infra.program import Program

    from .plan import LayerPlan

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
MIN_GAIN = 0.1  # smoothing must remove 10% of a group's error to be worth its Mul
WIDE_MIN_GAIN = 0.8  # ... and 80% (a 5x drop) when the input is wider than the outputs
_KEEP_ROWS = 2048


class SmoothStats:
    """Per-channel ``max |x|`` over every calibration batch, and the first batches whole (up to
    ``keep_rows``, for choosing alpha).

    Padding rows count: a runtime quantizer with one scale per tensor sees them too (on MiniLM, leaving
    them out measured cosine 0.993 instead of 0.996).
    """

    def __init__(self, features: int, keep_rows: int = _KEEP_ROWS) -> None:
        self.absmax = torch.zeros(features, dtype=torch.float32)
        self.batches: list[torch.Tensor] = []
        self.rows = 0
        self.keep_rows = keep_rows

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float32)
        if rows.shape[0]:
            self.absmax = torch.maximum(self.absmax, rows.abs().amax(0))
        if self.rows < self.keep_rows:
            self.batches.append(rows)
        self.rows += rows.shape[0]


def smoothing_factor(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s`` for layers reading one input (``weights``: their ``[out, in]`` weights)."""
    wmax = torch.stack([w.detach().abs().amax(0).float().cpu() for w in weights]).amax(0).clamp_min(1e-5)
    return (absmax.clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)


def w8a8_error(batches: list[torch.Tensor], weights: list[torch.Tensor], s: torch.Tensor | None,
               activations: str = "per_tensor") -> float:
    """Relative output error of the layers under w8a8 (RTN 7-bit weights) with input divided by ``s``."""
    err = energy = 0.0
    for w in weights:
        w = w.detach().float().cpu()
        ws = w if s is None else w * s
        codes, scale = quantize_weight(ws, "int8", 0, W8A8_QMAX)
        packed = pack(codes, "int8")
        for x in batches:
            ref = x @ w.T
            xs = x if s is None else x / s
            got = quant_linear_reference(xs, packed, scale, "int8", 0, w.shape[1], activations)
            err += float((got - ref).pow(2).sum())
            energy += float(ref.pow(2).sum())
    return err / max(energy, 1e-30)


def choose_alpha(stats: SmoothStats, weights: list[torch.Tensor], alpha: float | None, activations: str = "per_tensor"
                 ) -> tuple[float, torch.Tensor | None, str]:
    """``(alpha, s or None, why)`` for one group: the given alpha, or the grid's best (``alpha=None``)."""
    if alpha is not None:
        return alpha, (smoothing_factor(stats.absmax, weights, alpha) if alpha > 0 else None), f"alpha={alpha}"
    base = w8a8_error(stats.batches, weights, None, activations)
    tried = {a: w8a8_error(stats.batches, weights, smoothing_factor(stats.absmax, weights, a), activations)
             for a in ALPHAS}
    best = min(tried, key=tried.get)
    wide = weights[0].shape[1] > sum(w.shape[0] for w in weights)
    if tried[best] <= (1 - (WIDE_MIN_GAIN if wide else MIN_GAIN)) * base:
        return best, smoothing_factor(stats.absmax, weights, best), \
            f"alpha={best} (layer error {tried[best]:.2e}, unsmoothed {base:.2e})"
    why = " (input wider than the outputs: needs a 5x drop)" if wide else ""
    return 0.0, None, f"not smoothed{why}: layer error {base:.2e}; the best alpha, {best}, gave {tried[best]:.2e}"


def fold_plan(program: Program, am: AnalysisManager, groups: list[list[str]],
              smooth: dict[str, torch.Tensor], plans: dict[str, LayerPlan], result: PassResult) -> dict[str, str]:
    """``{consumer: producer}``: SmoothQuant factors that can move into an earlier layer's per-channel scales,
    each proven exact on the float model's graph (:mod:`graphopt.analysis.channel_scale`); every factor left
    as a ``Mul`` is noted with why."""
    singles = [g[0] for g in groups if len(g) == 1 and g[0] in smooth]  # a shared input: no single producer
    if not singles:
        return {}
    try:
        ep = am.get("exported")
    except CaptureError as e:
        result.note("", "SmoothQuant factors stay as a Mul before each layer: the model could not be captured "
                        f"to prove a fold ({str(e).splitlines()[0]})")
        return {}
    folds: dict[str, str] = {}
    for name in singles:
        reasons = []
        for producer in producers_of(ep, name):
            plan = plans.get(producer)
            why = ("it is not quantized by this pass" if plan is None else
                   f"its scales are per group of {plan.group_size}" if plan.group_size else
                   scale_path(ep, producer, name))
            if not why:
                folds[name] = producer
                break
            reasons.append(f"{producer}: {why}")
        if name not in folds:
            result.note(name, "SmoothQuant factor stays a Mul before the layer (no earlier layer carries it "
                              "exactly: " + ("; ".join(reasons) or "no layer feeds it") + ")")
    return folds

def fold_factor(program: Program, consumer: str, producer: str, result: PassResult) -> None:
    """Move ``consumer``'s SmoothQuant factor into ``producer``'s per-channel scales and bias (proven exact)."""
    factor = program.get_submodule(consumer).smooth.detach().clone()
    layer = program.get_submodule(producer)
    program.set_tensor(f"{producer}.scale", layer.scale * factor[:, None].to(layer.scale.dtype))
    if layer.bias is not None:
        program.set_tensor(f"{producer}.bias", (layer.bias * factor.to(layer.bias.dtype)).detach())
    program.set_tensor(f"{consumer}.smooth", None)
    result.note(consumer, f"SmoothQuant factor moved into {producer}'s per-channel scales (proven exact on the "
                          "graph; no Mul)")
