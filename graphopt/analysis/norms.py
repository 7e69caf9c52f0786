"""Structural recognition of normalisation layers (LayerNorm, RMSNorm and their look-alikes).

Detection never trusts class names. A module is *norm-like* when it has an epsilon attribute
(``eps``, ``variance_epsilon``, ``epsilon``) or is a torch normalisation layer; it is a *convertible
norm* when a probe (a float32 CPU copy with randomised affine parameters, run on random inputs)
reproduces ``LN(x)·w + b`` or ``RMS(x)·w`` over the last dim (or over dim 1, channels-first, as
ConvNeXt's ``data_format="channels_first"``), with ``w`` its weight or ``1 + weight`` (Gemma).
The elementwise replacements (DyT, ELN) live in :mod:`graphopt.nn.dyt`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]

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
