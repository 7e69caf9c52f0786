"""Output gradients under random probes: one backward pass per calibration batch, with no labels.

For a model ``f`` with float outputs and a probe ``r ~ N(0, I)`` shaped like them, the gradient of
``<r, f(x)>`` with respect to the parameters is ``g = Jᵀr``, and ``E_r[g gᵀ] = JᵀJ``: squared gradients
estimate the diagonal of the Gauss-Newton matrix of the output error (Hutchinson's estimator), and
``(gᵀΔθ)²`` estimates ``|J Δθ|²``, the squared first-order change of the outputs under a change ``Δθ``.
Two estimates read them: ``prune(importance=taylor)`` (the output change of removing a unit, Molchanov et
al. 2019 with the outputs as target) and ``quantize(budget_bits=...)`` (each layer's rounding error weighed
by that diagonal, the second-order sensitivity of HAWQ-V2 (Dong et al. 2020) and of ModelOpt's
``auto_quantize``, here without a task loss).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import as_example_inputs, flatten_outputs
from ..progress import track


def probe_gradients(model: nn.Module, batches: Sequence[Any], params: Sequence[torch.Tensor] | None = None, *,
                    who: str, seed: int = 0) -> Iterator[float]:
    """For each batch: the gradient of ``<r, f(batch)>`` on ``params`` (every float parameter by default),
    left in their ``.grad``; yields the squared norm of that batch's float outputs, then clears the gradients.

    Only ``params`` require grad meanwhile; their flags, and any gradients the model held, are restored
    afterwards (the goal search probes the caller's model). ``who`` names the caller in
    the error raised when no output depends on ``params``."""
    if not batches:
        raise ValueError(f"{who}: the calibration data is empty")
    chosen = list(params) if params is not None else [p for p in model.parameters() if p.is_floating_point()]
    generator = torch.Generator().manual_seed(seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}  # the caller's, put back afterwards
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                outputs = [t for t in flatten_outputs(as_example_inputs(batch).call(model)).values()
                           if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                if not outputs:
                    raise ValueError(f"{who}: the model's outputs do not depend on the parameters it ranks")
                probe = sum((t * torch.randn(t.shape, generator=generator).to(t)).sum() for t in outputs)
                probe.backward()
            yield sum(float(t.detach().float().pow(2).sum()) for t in outputs)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        for p, grad in grads.items():
            p.grad = grad


def fisher_diagonal(model: nn.Module, params: dict[str, torch.Tensor], batches: Sequence[Any], *, who: str
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """``({name: Σ g²}, Σ |f|²)`` over ``batches``: each parameter's squared probed gradients summed (the diagonal of
    ``JᵀJ``, float32, shaped like the parameter) and the outputs' squared norm, from one backward pass per batch.

    ``Σ diag ⊙ Δθ² / Σ |f|²`` then estimates the relative squared output change a change ``Δθ`` of one parameter
    causes alone (what ``quantize(budget_bits=...)`` and the goal search's per-layer plans rank layers by)."""
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in params.items()}
    energy = 0.0
    for batch_energy in track(probe_gradients(model, batches, list(params.values()), who=who),
                              f"{who}: sensitivity of every layer (probed gradients)", total=len(batches), unit="batch"):
        energy += batch_energy
        for name, weight in params.items():
            if weight.grad is not None:
                fisher[name] += weight.grad.detach().float().pow(2)
    return fisher, energy
