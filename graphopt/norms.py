"""Normalisation layers: structural detection of LayerNorm/RMSNorm, and their elementwise replacements.

Detection never trusts class names. A module is *norm-like* when it has an epsilon attribute
(``eps``, ``variance_epsilon``, ``epsilon``) or is a torch normalisation layer; it is a *convertible
norm* when a probe (a float32 CPU copy with randomised affine parameters, run on random inputs)
reproduces ``LN(x)·w + b`` or ``RMS(x)·w`` over the last dim (or over dim 1, channels-first, as
ConvNeXt's ``data_format="channels_first"``), with ``w`` its weight or ``1 + weight`` (Gemma).

Replacements (both elementwise, no statistics over channels, hence fast and fusable):

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

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]
Squash = Callable[[torch.Tensor], torch.Tensor]

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
_WEIGHT_NAMES = ("weight", "gamma", "scale", "g")
_BIAS_NAMES = ("bias", "beta", "shift", "b")
_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm,
                nn.modules.batchnorm._NormBase)


# --- detection ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NormInfo:
    """A recognised norm: its kind, channel count and layout, epsilon and effective affine.

    ``weight`` is the effective per-channel scale (``1 + w`` for Gemma-style norms), ``None`` when
    the norm has no affine; ``bias`` is ``None`` when it has no shift.
    """

    kind: NormKind
    channels: int
    channel_dim: int  # -1: normalised over the last dim; 1: channels-first (B, C, ...)
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    weight_offset: float = 0.0


def is_norm_like(module: nn.Module) -> bool:
    """A module worth probing (or reporting): has an epsilon attribute or is a torch norm layer."""
    if isinstance(module, _TORCH_NORMS):
        return True
    return any(isinstance(getattr(module, a, None), (float, int)) and not isinstance(getattr(module, a), bool)
               for a in EPS_ATTRS) or "norm" in type(module).__name__.lower()


def _eps_of(module: nn.Module) -> float | None:
    for a in EPS_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, (float, int)) and not isinstance(v, bool):
            return float(v)
    return None


def _affine_names(module: nn.Module) -> tuple[str | None, str | None, list[str]]:
    params = dict(module.named_parameters(recurse=False))
    w = next((n for n in _WEIGHT_NAMES if n in params), None)
    b = next((n for n in _BIAS_NAMES if n in params), None)
    extra = [n for n in params if n not in (w, b)]
    return w, b, extra


def _channels_of(module: nn.Module, weight_name: str | None) -> int | str:
    if weight_name is not None:
        w = getattr(module, weight_name)
        if w.dim() != 1:
            return f"weight has shape {tuple(w.shape)}; only per-channel (1-D) norms convert"
        return int(w.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) > 1:
        return f"normalises over {len(shape)} dims {tuple(shape)}; only one channel dim converts"
    return "no 1-D weight and no normalized_shape: cannot tell the channel count"


def reference_norm(x: torch.Tensor, kind: NormKind, eps: float, dim: int = -1) -> torch.Tensor:
    """LN (``kind="layernorm"``) or RMS normalisation of ``x`` over ``dim``, without affine."""
    if kind == "layernorm":
        x = x - x.mean(dim, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)


def _probe_clone(module: nn.Module, w_name: str | None, b_name: str | None,
                 gen: torch.Generator) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]:
    clone = copy.deepcopy(module)
    if any(t.device.type == "meta" for t in clone.parameters(recurse=False)):
        clone = clone.to_empty(device="cpu")
    clone = clone.to(device="cpu", dtype=torch.float32).eval()
    w = b = None
    with torch.no_grad():
        if w_name is not None:
            w = getattr(clone, w_name)
            w.copy_(torch.rand(w.shape, generator=gen) + 0.5)
        if b_name is not None:
            b = getattr(clone, b_name)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
    return clone, w, b


def probe_norm(module: nn.Module) -> NormInfo | str:
    """Recognise ``module`` as a LayerNorm or RMSNorm by running a copy of it; else say why not."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{type(module).__name__} normalises with batch statistics, not per position (see fold_bn)"
    w_name, b_name, extra = _affine_names(module)
    if extra:
        return f"has parameters besides weight/bias ({', '.join(extra)})"
    channels = _channels_of(module, w_name)
    if isinstance(channels, str):
        return channels
    if channels < 2:
        return f"has {channels} channel(s); nothing to normalise"
    eps = _eps_of(module)
    if eps is None:
        eps = torch.finfo(torch.float32).eps if isinstance(module, nn.RMSNorm) else None
    if eps is None:
        return "no epsilon attribute (eps / variance_epsilon / epsilon)"
    gen = torch.Generator().manual_seed(1234)
    try:
        clone, w, b = _probe_clone(module, w_name, b_name, gen)
    except Exception as e:  # noqa: BLE001 - any failure to copy means we cannot probe
        return f"cannot copy it for probing ({type(e).__name__}: {e})"
    best = math.inf
    errors: list[str] = []
    for channel_dim, shape in ((-1, (2, 3, channels)), (1, (2, channels, 3, 2))):
        x = torch.randn(shape, generator=gen) * 2.0 + torch.randn(shape[0], 1, 1, *shape[3:], generator=gen)
        try:
            with torch.no_grad():
                out = clone(x)
        except Exception as e:  # noqa: BLE001 - a layout the module does not accept
            errors.append(f"{'last-dim' if channel_dim == -1 else 'channels-first'} input: {type(e).__name__}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            errors.append("output is not a tensor of the input's shape")
            continue
        view = [1] * x.dim()
        view[channel_dim] = channels
        found = _match(out, x, w, b, view, eps, channel_dim)
        best = min(best, found[1])
        if found[0] is not None:
            kind, offset = found[0]
            real_w = getattr(module, w_name).detach() + offset if w_name else None
            real_b = getattr(module, b_name).detach() if b_name else None
            return NormInfo(kind, channels, channel_dim, eps, real_w, real_b, offset)
    if errors and best == math.inf:
        return "probe failed: " + "; ".join(errors)
    return (f"output matches neither LayerNorm nor RMSNorm over the last dim or channel dim 1 "
            f"(best relative error {best:.2g})")


@torch.no_grad()
def _match(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, view: list[int],
           eps: float, channel_dim: int) -> tuple[tuple[NormKind, float] | None, float]:
    """Which (kind, weight offset) reproduces ``out`` from ``x``, and the best relative error."""
    best = math.inf
    shift = b.view(view) if b is not None else 0.0
    for kind in ("layernorm", "rmsnorm"):
        normed = reference_norm(x, kind, eps, channel_dim)
        for offset in (0.0, 1.0) if w is not None else (0.0,):
            ref = normed * ((w + offset).view(view) if w is not None else 1.0) + shift
            err = float((out - ref).abs().max() / ref.abs().max())
            best = min(best, err)
            if err < 1e-4:
                return (kind, offset), err
    return None, best


# --- elementwise replacements ----------------------------------------------------------------------

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
