"""Least-squares reconstruction of the layers that read pruned channels (``prune(reconstruct=true)``).

Removing channels takes their contribution out of every layer that reads them. A Linear, or a 1x1
Conv2d, that reads pruned channels has its remaining weights (and bias) refit so that its outputs on
calibration inputs move least: with ``z = [x; 1]`` the layer's input in the original model (and a constant
for the bias), ``A = [W, b]``, ``T`` the inputs kept and ``R`` those removed, the least-squares solution is

    A'_T = A_T + A_R G[R, T] G[T, T]⁻¹,   G = E[z zᵀ]

(the Gram matrix GPTQ reads), here with ``G[T, T]``'s diagonal raised by a fraction of itself: a ridge towards
``A_T``, the plain cut, which a refit on too few rows would otherwise overfit. He et al. 2017 ("Channel Pruning for Accelerating
Very Deep Neural Networks") refit the next layer this way; FLAP (An et al. 2024) compensates with the bias
alone, the special case where only the constant is kept. The kept inputs of such a layer keep their values
when the layers producing them are only cut (their other channels unchanged), which is what a prune does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graphopt.analysis.calibration import GramAccumulator, layer_input_stats
from graphopt.infra.contract import PassResult
from graphopt.infra.program import Program

#: ridge of the refit towards the plain cut: this fraction of each input's own E[x²] added to G[T, T]'s diagonal
#: (per input, as LLM activations span orders of magnitude between channels). On SmolLM2's down_proj (25% of
#: 1536 inputs cut, 16k calibration rows) held-out output error: 0.067 plain cut, 0.051 at 0, 0.046 at 0.1-0.3.
DAMP = 0.2
#: fewer calibration rows than this many per input kept: the refit is noted as likely to overfit
ROWS_PER_INPUT = 4


@dataclass
class Reader:
    """A layer that reads pruned inputs, with its weights before the cut."""

    name: str
    weight: torch.Tensor  # [out, in] (a 1x1 convolution's kernel flattened)
    bias: torch.Tensor | None


def readers(program: Program, masks: dict[tuple[str, int], np.ndarray], result: PassResult) -> list[Reader]:
    """The layers whose input features ``masks`` cut and that can be refit; the others are noted."""
    found: list[Reader] = []
    for (canonical, dim), mask in masks.items():
        if mask.all() or dim != 1:
            continue
        names = [canonical, *program.aliases(canonical)]  # a tied weight: a reader under another name
        for fqn in names:
            name, _, attr = fqn.rpartition(".")
            module = program.get_submodule(name) if name else program.module
            if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            why = _not_refittable(module, [n for n in names if n != fqn])
            if why:
                result.note(name, f"not refit after pruning its inputs: {why}", "info")
                continue
            weight = module.weight.detach().reshape(module.weight.shape[0], -1).clone()
            bias = None if module.bias is None else module.bias.detach().clone()
            found.append(Reader(name, weight, bias))
    return found


def _not_refittable(module: nn.Module, tied_to: list[str]) -> str:
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or tuple(module.kernel_size) != (1, 1)):
        return "a convolution other than 1x1 with groups=1 (its inputs would be patches)"
    if tied_to:
        return f"its weight is tied to {tied_to[0]}"
    if not module.weight.is_floating_point():
        return "its weight is not floating point"
    return ""


def input_grams(program: Program, found: list[Reader], batches: list) -> dict[str, GramAccumulator]:
    """The Gram matrix of each reader's inputs over ``batches``, in the model before the cut."""
    layers = {r.name: program.get_submodule(r.name) for r in found}
    grams = layer_input_stats(program.module, layers, batches, GramAccumulator)
    missed = [name for name, g in grams.items() if g.rows == 0]
    if missed:
        raise ValueError(f"prune(reconstruct=true): the calibration data never reaches {missed[:3]}; give "
                         "inputs that run every layer, or reconstruct=false")
    return grams


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: GramAccumulator, kept: np.ndarray,
          damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')``: the weights on the kept inputs ``kept`` (a mask over ``weight``'s columns) and the bias that
    best reproduce ``weight @ x + bias`` on the accumulated inputs.

    The compensation ``A_R G[R, T] (G[T, T] + damp·diag G[T, T])⁻¹`` added to the kept weights ``A_T`` is the
    least-squares one at ``damp=0``; ``damp`` pulls it towards no change (ridge towards ``A_T``, scaled by each
    input's own ``E[x²]``), which keeps a fit on a few thousand rows from chasing their noise.
    """
    n = gram.rows
    g = gram.gram / n
    a = weight.to(torch.float64)
    if bias is not None:  # the constant input 1: E[x] beside E[x xᵀ]
        mean = gram.total / n
        g = torch.cat([torch.cat([g, mean[:, None]], 1), torch.cat([mean, torch.ones(1, dtype=g.dtype)])[None]], 0)
        a = torch.cat([a, bias.to(torch.float64)[:, None]], 1)
        kept = np.append(kept, True)
    t, r = torch.as_tensor(np.nonzero(kept)[0]), torch.as_tensor(np.nonzero(~kept)[0])
    g_tt = g[t][:, t]
    diag = torch.diagonal(g_tt).clamp_min(1e-12 * float(torch.diagonal(g_tt).max()) + 1e-30)
    g_tt = g_tt + torch.diag(damp * diag)
    solved = a[:, t] + torch.linalg.solve(g_tt, g[t][:, r] @ a[:, r].T).T
    if bias is None:
        return solved.to(weight.dtype), None
    return solved[:, :-1].to(weight.dtype), solved[:, -1].to(bias.dtype)


def apply_refits(program: Program, found: list[Reader], grams: dict[str, GramAccumulator],
                 masks: dict[tuple[str, int], np.ndarray], result: PassResult) -> int:
    """Refit each reader whose inputs the final plan ``masks`` cut; returns how many were refit."""
    done, few = 0, []
    for r in found:
        kept = masks.get((f"{r.name}.weight", 1))
        if kept is None or kept.all():
            continue
        if grams[r.name].rows < ROWS_PER_INPUT * int(kept.sum()):
            few.append(f"{r.name} ({grams[r.name].rows} rows, {int(kept.sum())} inputs)")
        weight, bias = refit(r.weight, r.bias, grams[r.name], kept)
        rows = masks.get((f"{r.name}.weight", 0))
        if rows is not None:
            weight = weight[torch.as_tensor(np.nonzero(rows)[0])]
        if bias is not None and (f"{r.name}.bias", 0) in masks:
            bias = bias[torch.as_tensor(np.nonzero(masks[(f"{r.name}.bias", 0)])[0])]
        module = program.get_submodule(r.name)
        old = module.weight
        if old.numel() != weight.numel():
            raise RuntimeError(f"prune(reconstruct=true): {r.name} holds {tuple(old.shape)} after the cut, the "
                               f"refit {tuple(weight.shape)}")
        program.set_tensor(f"{r.name}.weight", weight.reshape(old.shape).to(old.device, old.dtype))
        if bias is not None:
            program.set_tensor(f"{r.name}.bias", bias.to(old.device, module.bias.dtype))
        done += 1
    if few:
        result.note(few[0].partition(" ")[0], f"{len(few)} layer(s) refit on fewer than {ROWS_PER_INPUT} calibration "
                    f"rows per input, e.g. {few[0]}: the refit may fit their noise; give more calibration data or "
                    "a larger calib_batches", "warning")
    result.note("", f"refit {done} layer(s) that read pruned channels by least squares on calibration inputs",
                "info")
    return done
