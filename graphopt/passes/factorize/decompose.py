"""Low-rank factors of one layer's weight, and the truncation loss of each rank.

Three methods, one shape: factor ``W S`` by SVD, where ``S`` weighs the input directions, and undo ``S`` in
the second factor, ``W ≈ (U_r Σ_r^½) (Σ_r^½ V_rᵀ S⁻¹)``:

- ``svd``: ``S = I`` (the weight alone; no calibration).
- ``asvd``: ``S = diag(rms(x))^α``, the inputs' per-channel scale (Yuan et al. 2023, "ASVD: Activation-aware
  Singular Value Decomposition"; the channel RMS from the Gram's diagonal stands in for its mean absolute value).
- ``whiten``: ``S Sᵀ = XᵀX``, the calibration Gram (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value
  Decomposition"): then ``‖(W - W_r) X‖²`` is exactly the sum of the dropped ``σᵢ²`` and the rank-``r`` factors
  are the optimal ones for the calibration inputs. ``S`` comes from an eigendecomposition of the Gram (as
  SVD-LLM V2, Wang et al. 2025), damped by a small fraction of its mean diagonal, so a singular Gram (inputs
  that span fewer directions than the layer has) does not fail where a Cholesky factor would.

All in float64; factors are returned in the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Method = Literal["svd", "asvd", "whiten"]

#: the Gram's damping, as a fraction of its mean diagonal (keeps ``S`` invertible on unseen directions)
DAMP = 1e-10


@dataclass
class Spectrum:
    """The SVD of one layer's weighted weight ``W S = U diag(σ) Vh``, with ``S⁻¹`` to undo the weighting."""

    u: torch.Tensor  # [out, k]
    sigma: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, in]
    s_inv: torch.Tensor | None  # [in, in] (whiten), [in] (asvd: a diagonal), None (svd)
    _tails: list[float] = field(default_factory=list, repr=False)  # Σ_{i ≥ r} σᵢ² for each r, computed once

    def _tail(self, rank: int) -> float:
        if not self._tails:
            squares = (self.sigma ** 2).flip(0).cumsum(0).flip(0)
            self._tails = [*squares.tolist(), 0.0]
        return self._tails[min(rank, len(self._tails) - 1)]

    @property
    def energy(self) -> float:
        """``Σ σᵢ²``: the weighted weight's squared norm (for ``whiten``, the output energy on calibration)."""
        return self._tail(0)

    def dropped(self, rank: int) -> float:
        """``Σ_{i ≥ rank} σᵢ²``: the squared truncation error in the method's own metric."""
        return self._tail(rank)

    def relative_loss(self, rank: int) -> float:
        """The share of :attr:`energy` that rank ``rank`` drops (0 at full rank)."""
        return self.dropped(rank) / self.energy if self.energy > 0 else 0.0

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, rank], down [rank, in])`` whose product is the rank-``rank`` approximation of ``W``."""
        root = self.sigma[:rank].sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        if self.s_inv is not None:
            down = down * self.s_inv if self.s_inv.dim() == 1 else down @ self.s_inv
        return up.to(dtype), down.to(dtype)


def whitening(gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` with ``S Sᵀ = gram + damp·mean(diag)·I`` (float64), from an eigendecomposition."""
    gram = gram.to(torch.float64)
    scale = float(gram.diagonal().mean())
    eps = damp * scale if scale > 0 else 1.0
    values, vectors = torch.linalg.eigh(gram + eps * torch.eye(gram.shape[0], dtype=gram.dtype))
    root = values.clamp_min(eps).sqrt()  # eigenvalues of a damped PSD matrix; the clamp absorbs rounding
    return vectors * root, (vectors / root).T


def spectrum(weight: torch.Tensor, method: Method, gram: torch.Tensor | None = None, rows: int = 0,
             alpha: float = 0.5) -> Spectrum:
    """The :class:`Spectrum` of ``weight`` (``[out, in]``) under ``method``; ``gram`` is ``Σ xᵀx`` over ``rows``."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    s_inv: torch.Tensor | None = None
    if method == "svd":
        weighted = w
    elif gram is None:
        raise ValueError(f"factorize(method={method}) reads the layer's calibration inputs; none were given")
    elif method == "asvd":
        rms = (gram.diagonal().clamp_min(0) / max(rows, 1)).sqrt()
        floor = float(rms[rms > 0].min()) if bool((rms > 0).any()) else 1.0
        s = rms.clamp_min(floor) ** alpha
        weighted, s_inv = w * s, 1.0 / s
    else:
        s, s_inv = whitening(gram)
        weighted = w @ s
    u, sigma, vh = torch.linalg.svd(weighted, full_matrices=False)
    return Spectrum(u, sigma, vh, s_inv)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖(W - W') X‖² / ‖W X‖²`` on the inputs whose Gram is ``gram``: the share of the output lost."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    d = w - approx.detach().to(device="cpu", dtype=torch.float64)
    total = float(torch.einsum("oi,ij,oj->", w, gram, w))
    return float(torch.einsum("oi,ij,oj->", d, gram, d)) / total if total > 0 else 0.0
