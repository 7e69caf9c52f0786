"""Elementwise replacements of normalisation layers, and their fit to a norm's outputs.

Both are elementwise (no statistics over channels), hence fast and fusable:

- :class:`DyT` -- Dynamic Tanh, Zhu et al. 2025, "Transformers without Normalization":
  ``DyT(x) = γ ⊙ tanh(α·x) + β``.
- :class:`ELN` -- Elementwise Layer Normalization, Stollenwerk 2025 (arXiv:2503.21708). The paper
  derives DyT from LN by treating the other channels' contribution to the statistics as fixed
  *and* approximating the resulting ODE; solving it exactly for RMS-style normalisation gives
  ``y = √C·x / √(x² + S)`` (S: the other channels' sum of squares), an inverse-square-root unit.
  What is implemented here: ``ELN(x) = γ ⊙ (α·x) / √(1 + (α·x)²) + β`` with one learnable scalar
  ``α`` per layer (playing ``1/√S``) and the constant ``√C`` folded into ``γ``. Like DyT it is
  linear with slope ``α·γ`` near 0 and saturates at ``±γ``, but approaches saturation
  algebraically (as LN does for an outlier channel), not exponentially.

:func:`fit_elementwise` fits ``α, γ, β`` of either to (input, output) pairs of a norm: for a fixed
``α`` the best ``γ, β`` are a per-channel linear least-squares problem (closed form), so the fit
is a one-dimensional search over ``α`` (global on a log grid, then golden-section refinement),
preferring the least saturated of near-equal fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

Squash = Callable[[torch.Tensor], torch.Tensor]


def isru(x: torch.Tensor) -> torch.Tensor:
    """Inverse square root unit ``x / √(1 + x²)``."""
    return x * torch.rsqrt(1.0 + x * x)


class _Elementwise(nn.Module):
    """``γ ⊙ f(α·x) + β`` over a channel dim; ``f`` is set by subclasses."""

    squash_name = ""

    def __init__(self, channels: int, *, channel_dim: int = -1, alpha0: float = 0.5, bias: bool = True,
                 per_channel_alpha: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (last) or 1 (channels-first), got {channel_dim}")
        factory = {"device": device, "dtype": dtype}
        self.channels, self.channel_dim, self.alpha0 = int(channels), int(channel_dim), float(alpha0)
        self.per_channel_alpha = bool(per_channel_alpha)
        self.alpha = nn.Parameter(torch.full((channels if per_channel_alpha else 1,), float(alpha0), **factory))
        self.weight = nn.Parameter(torch.ones(channels, **factory))
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if bias else None

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change
    graphopt_spec_version: ClassVar[int] = 1

    def graphopt_spec(self) -> dict[str, Any]:
        return {"channels": self.channels, "channel_dim": self.channel_dim, "alpha0": self.alpha0,
                "bias": self.bias is not None, "per_channel_alpha": self.per_channel_alpha}

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1 or t.numel() == 1:
            return t
        return t.view(-1, *([1] * (x.dim() - 2)))

    def squash(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b = self._view(self.bias, x) if self.bias is not None else None
        return self._view(self.alpha, x), self._view(self.weight, x), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, w, b = self._parts(x)
        y = w * self.squash(a * x)
        if b is not None:
            y = y + b
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        a = self.alpha.detach()
        alpha = f"{float(a):.3g}" if a.numel() == 1 else f"[{a.numel()} values]"
        cf = ", channels_first" if self.channel_dim == 1 else ""
        return f"{self.channels}, alpha={alpha}, bias={self.bias is not None}{cf}"


class DyT(_Elementwise):
    """Dynamic Tanh: ``γ ⊙ tanh(α·x) + β`` (Zhu et al. 2025). ``fused=True`` uses ``graphopt::dyt``."""

    squash_name = "tanh"

    def __init__(self, channels: int, *, channel_dim: int = -1, alpha0: float = 0.5, bias: bool = True,
                 per_channel_alpha: bool = False, fused: bool = False, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(channels, channel_dim=channel_dim, alpha0=alpha0, bias=bias,
                         per_channel_alpha=per_channel_alpha, device=device, dtype=dtype)
        self.fused = bool(fused)

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change
    graphopt_spec_version: ClassVar[int] = 1

    def graphopt_spec(self) -> dict[str, Any]:
        return {**super().graphopt_spec(), "fused": self.fused}

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            # γ·tanh(αx) + β == 2γ·σ(2αx) + (β − γ) exactly; torch's CPU sigmoid is several times faster
            # than its tanh, and without autograd the chain runs in place (one buffer)
            a, w, b = self._parts(x)
            shift = b - w if b is not None else -w
            if self._needs_grad(x):
                return (2.0 * w * torch.sigmoid(2.0 * a * x) + shift).to(x.dtype)
            return torch.mul(x, 2.0 * a).sigmoid_().mul_(2.0 * w).add_(shift).to(x.dtype)
        from graphopt.kernels.dyt import dyt

        if self.channel_dim == 1:
            return dyt(x.movedim(1, -1), self.alpha, self.weight, self.bias).movedim(-1, 1)
        return dyt(x, self.alpha, self.weight, self.bias)


class ELN(_Elementwise):
    """Elementwise Layer Normalization: ``γ ⊙ (α·x)/√(1 + (α·x)²) + β`` (see the module docstring)."""

    squash_name = "isru"

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return isru(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_grad(x):
            return super().forward(x)
        a, w, b = self._parts(x)
        z = torch.mul(x, a)
        y = torch.mul(z, z).add_(1.0).rsqrt_().mul_(z).mul_(w)
        return (y.add_(b) if b is not None else y).to(x.dtype)


VARIANTS: dict[str, type[_Elementwise]] = {"dyt": DyT, "eln": ELN}
SQUASH: dict[str, Squash] = {"dyt": torch.tanh, "eln": isru}


# --- calibration -----------------------------------------------------------------------------------

@dataclass
class Fit:
    """Result of :func:`fit_elementwise`: parameters and the relative mean squared error."""

    alpha: torch.Tensor  # shape (1,) or (C,)
    weight: torch.Tensor
    bias: torch.Tensor | None
    rel_mse: float  # residual / total sum of squares of the target (per channel, summed)


def _per_channel_fit(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, squash: Squash, bias: bool,
                     y_stats: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """For each channel the least-squares ``γ, β`` given ``α``; returns (γ, β, residual sum of squares)."""
    n = x.shape[0]
    t = squash(x * alpha)
    st, stt, sty = t.sum(0, dtype=torch.float64), (t * t).sum(0, dtype=torch.float64), (t * y).sum(0, dtype=torch.float64)
    sy, syy = y_stats
    if bias:
        var_t = stt - st * st / n
        cov = sty - st * sy / n
        gamma = torch.where(var_t > 1e-12, cov / var_t.clamp_min(1e-12), torch.zeros_like(cov))
        beta = (sy - gamma * st) / n
        rss = (syy - sy * sy / n) - gamma * cov
    else:
        gamma = torch.where(stt > 1e-12, sty / stt.clamp_min(1e-12), torch.zeros_like(sty))
        beta = torch.zeros_like(gamma)
        rss = syy - gamma * sty
    return gamma, beta, rss.clamp_min(0.0)


def fit_elementwise(x: torch.Tensor, y: torch.Tensor, squash: Squash, *, bias: bool = True,
                    per_channel_alpha: bool = False, grid: int = 32, refine: int = 16,
                    slack: float = 0.02, min_alpha_rms: float = 0.1) -> Fit:
    """Least-squares fit of ``y ≈ γ ⊙ squash(α·x) + β`` over rows of ``x, y`` (shape ``(N, C)``).

    ``γ, β`` are solved in closed form for each ``α``; ``α`` is searched on a log grid from
    ``min_alpha_rms / RMS(x)`` to ``30 / RMS(x)``, then refined by golden-section search (per channel when ``per_channel_alpha``).
    Of the grid's local minima within ``slack`` (relative) of the best, the smallest ``α`` is
    refined: near-equal fits are common (linear vs saturated regime) and the less saturated one
    heals better. The lower bound keeps the layer a squashing function (an input at ``1/min_alpha_rms``
    times the RMS saturates) rather than a purely linear map whose ``γ ≈ w/α`` would be huge and
    badly scaled for later distillation (Adam's steps are absolute).
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"fit_elementwise needs two (N, C) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.detach().float(), y.detach().float()
    sy, syy = y.sum(0, dtype=torch.float64), (y * y).sum(0, dtype=torch.float64)
    total = float(((syy - sy * sy / y.shape[0]) if bias else syy).sum().clamp_min(1e-30))
    rms = float(x.pow(2).mean().sqrt().clamp_min(1e-12))
    log_lo, log_hi = math.log(min_alpha_rms / rms), math.log(30.0 / rms)
    logs = torch.linspace(log_lo, log_hi, grid, dtype=torch.float64)

    def rss_at(log_alpha: torch.Tensor) -> torch.Tensor:  # (C,) residuals
        a = log_alpha.exp().float()
        return _per_channel_fit(x, y, a, squash, bias, (sy, syy))[2]

    losses = torch.stack([rss_at(la.expand(1)) for la in logs])  # (grid, C)
    if not per_channel_alpha:
        losses = losses.sum(1, keepdim=True)
    # the smallest-alpha local minimum within `slack` of the best: of near-equal fits, the least
    # saturated one (tanh's gradient vanishes when saturated, which later distillation needs)
    inf = torch.full_like(losses[:1], math.inf)
    local = (losses <= torch.cat([inf, losses[:-1]])) & (losses <= torch.cat([losses[1:], inf]))
    near = local & (losses <= losses.min(0).values * (1.0 + slack))
    idx = near.to(torch.int8).argmax(0).expand(x.shape[1])
    step = (log_hi - log_lo) / (grid - 1)
    lo, hi = logs[idx] - step, logs[idx] + step
    invphi = (math.sqrt(5) - 1) / 2
    reduce = (lambda r: r) if per_channel_alpha else (lambda r: r.sum().expand_as(r))
    c, d = hi - invphi * (hi - lo), lo + invphi * (hi - lo)
    fc, fd = reduce(rss_at(c)), reduce(rss_at(d))
    for _ in range(refine):  # golden section: one new point per step (per channel)
        left = fc < fd  # the minimum lies in [lo, d]
        hi, lo = torch.where(left, d, hi), torch.where(left, lo, c)
        new = torch.where(left, hi - invphi * (hi - lo), lo + invphi * (hi - lo))
        f_new = reduce(rss_at(new))
        c, d, fc, fd = (torch.where(left, new, d), torch.where(left, c, new),
                        torch.where(left, f_new, fd), torch.where(left, fc, f_new))
    log_alpha = (lo + hi) / 2
    if not per_channel_alpha:
        log_alpha = log_alpha[:1]
    alpha = log_alpha.exp().float()
    gamma, beta, rss = _per_channel_fit(x, y, alpha, squash, bias, (sy, syy))
    return Fit(alpha, gamma.float(), beta.float() if bias else None, float(rss.sum()) / total)
