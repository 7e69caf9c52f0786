"""CPU paths of ``graphopt::quant_linear`` built on torch's own integer and packed kernels.

- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32; oneDNN, AMX / VNNI where the CPU has them).
  w8a8 quantizes its input exactly as the reference does and multiplies the integer codes, so the
  result is the reference's up to float rounding of the scaling. Per-tensor (uint8 codes ``q``
  with zero point ``z``) multiplies ``q - 128`` and adds ``(128 - z)`` times the weight's column sums,
  which the same call computes as one extra input row of ones. Weight-only int8 splits each input row
  into three int8 digits (``x = s1 q1 + s2 q2 + s3 q3``, each digit's scale 1/254 of the one before:
  what is left is within ``max|x_row| / 2^23``, float32's rounding of the row's largest element),
  multiplies the stacked digits once, and recombines: float32 accuracy from an integer GEMM.
- ``onednn``: the same integer products on oneDNN's int8 linear (``onednn::qlinear_pointwise``, what
  inductor lowers x86 int8 models to) with the weight reordered once into oneDNN's blocked layout
  (``onednn::qlinear_prepack``): ``_int_mm`` reorders the weight on every call, which dominates a small
  GEMM. The reordered copy is an opaque tensor that cannot be saved or copied, so it is not part of the
  layer: a side table keyed by the packed codes (and their version counter, so codes changed in place are
  packed again) holds it, one more byte per weight while the layer lives. Its input goes in as uint8
  (``q + 128`` with zero point 128, which oneDNN folds into the weight's column sums): given int8
  activations the oneDNN in torch 2.13 runs a reference kernel, measured 700x slower at 3 x 576 x 1536.
- ``int8_mm``: ``torch._weight_int8pack_mm``, weight-only int8 with one scale per channel, computed in
  the input's dtype (fast for bfloat16 and float16 inputs on this CPU; slow for float32).

Which of them runs a layer under ``backend="auto"`` is measured, not assumed: :mod:`.quant_dispatch`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .activations import dynamic_quantize_uint8, per_token_quantize_int8

#: the CPU backends of this module
CPU_BACKENDS = ("int_mm", "onednn", "int8_mm")


#: whether this torch has oneDNN's int8 linear (a constant: dynamo does not trace torch.backends)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def why_not(backend: str, scheme: str, group_size: int, activations: str) -> str | None:
    """Why ``backend`` cannot run a layer of this format, naming what can (``None``: it can)."""
    if backend in ("int_mm", "onednn") and (scheme != "int8" or group_size > 0):
        return (f"backend={backend!r} runs int8 weights with one scale per channel (w8a8 or weight-only), not "
                f"{scheme} with group_size={group_size}; use backend='auto' or 'torch'")
    if backend == "onednn" and not ONEDNN:
        return "backend='onednn' needs torch built with oneDNN (torch.backends.mkldnn); use backend='int_mm'"
    if backend == "int8_mm" and (scheme != "int8" or group_size > 0 or activations != "none"):
        return (f"backend='int8_mm' runs weight-only int8 with one scale per channel, not {scheme} with "
                f"group_size={group_size}, activations={activations!r}; use backend='auto' (or 'int_mm' for w8a8)")
    return None


def runs_on(backend: str, x: Tensor) -> str | None:
    """Why ``backend`` cannot run on ``x``'s device (``None``: it can)."""
    if backend in CPU_BACKENDS and x.device.type != "cpu":
        return (f"backend={backend!r} runs on CPU tensors (this input is on {x.device}); use backend='auto' "
                "(Triton on CUDA) or 'torch'")
    return None


def int_mm_linear(x: Tensor, qweight: Tensor, scale: Tensor, in_features: int, activations: str) -> Tensor:
    """``x @ W.T`` for int8 weights with one scale per channel, on ``torch._int_mm`` (see the module docstring)."""
    codes_t = qweight.t()  # oneDNN reads the transposed view faster than a contiguous copy (measured)
    return _integer_linear(x, scale, in_features, activations, qweight.shape[0],
                           lambda q, w_scale: torch._int_mm(q, codes_t) * w_scale)


def onednn_linear(x: Tensor, qweight: Tensor, scale: Tensor, in_features: int, activations: str) -> Tensor:
    """``x @ W.T`` for int8 weights with one scale per channel, on oneDNN's int8 linear with the weight
    reordered once (see the module docstring); the same integer products as :func:`int_mm_linear`."""
    return _integer_linear(x, scale, in_features, activations, qweight.shape[0],
                           lambda q, w_scale: _onednn_products(q, qweight, w_scale))


def _integer_linear(x: Tensor, scale: Tensor, in_features: int, activations: str, out_features: int,
                    products: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """What both integer paths share: the input as int8 codes (per token, per tensor less 128 with a row of
    ones for the weight's column sums, or three digits for weight-only), ``products(q, w_scale)`` (float32
    ``(q @ codes.T) * w_scale``), then the input's scales."""
    flat = _as(x.reshape(-1, in_features), torch.float32)  # eager mode: every op counts, no-op casts included
    rows = flat.shape[0]
    w_scale = _as(scale[:, 0], torch.float32)
    if activations == "per_token":
        q, x_scale = per_token_quantize_int8(flat)
        y = products(q.to(torch.int8), w_scale) * x_scale
    elif activations == "per_tensor":
        q, x_scale, zero = dynamic_quantize_uint8(flat)
        ones = torch.ones(1, in_features, dtype=torch.int8, device=x.device)
        acc = products(torch.cat([(q - 128).to(torch.int8), ones]), w_scale)  # the last row: column sums
        y = torch.addcmul(acc[:rows], 128 - zero, acc[rows:]) * x_scale
    else:
        digits, digit_scales = _int8_digits(flat)
        acc = products(digits, w_scale) * digit_scales
        y = acc[:rows] + acc[rows:2 * rows] + acc[2 * rows:]
    return _as(y, x.dtype).reshape(*x.shape[:-1], out_features)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_reordered: WeakIdKeyDictionary = WeakIdKeyDictionary()  # packed codes -> (version, oneDNN's copy, zero points)


def _onednn_products(q: Tensor, qweight: Tensor, w_scale: Tensor) -> Tensor:
    """``(q @ codes.T) * w_scale`` in float32 for int8 ``q``, on oneDNN with the codes reordered once."""
    try:
        version = qweight._version
    except RuntimeError:  # an inference-mode tensor has no version counter: it cannot change in place either
        version = -1
    hit = _reordered.get(qweight)
    if hit is None or hit[0] != version:
        zeros = torch.zeros(qweight.shape[0], dtype=torch.long)  # the weight's zero points
        hit = (version, torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None), zeros)
        _reordered[qweight] = hit
    shifted = q.view(torch.uint8) ^ 128  # q + 128: int8 activations take oneDNN's slow reference kernel
    return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, hit[1], w_scale, hit[2], None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _int8_digits(x: Tensor) -> tuple[Tensor, Tensor]:
    """Three int8 digits per row (stacked: ``[3 * rows, k]``) and their scales (``[3 * rows, 1]``) whose sum
    ``s1 q1 + s2 q2 + s3 q3`` is ``x`` to within ``max|x_row| / 2^23`` (the digits alone would leave
    ``max|x_row| / (2 * 127 * 254^2)``; float32 arithmetic on the remainders adds its rounding)."""
    s1 = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    q1 = torch.round(x / s1)
    rest = x - q1 * s1  # |rest| <= s1 / 2 = 127 * s2 / 2
    s2 = s1 / 254
    q2 = torch.round(rest / s2)
    rest = rest - q2 * s2
    s3 = s2 / 254
    q3 = torch.round(rest / s3).clamp(-127, 127)
    return torch.cat([q1, q2, q3]).to(torch.int8), torch.cat([s1, s2, s3])


def int8pack_linear(x: Tensor, qweight: Tensor, scale: Tensor, in_features: int) -> Tensor:
    """``x @ W.T`` on ``torch._weight_int8pack_mm`` (weight-only int8, one scale per channel), in ``x``'s dtype."""
    flat = x.reshape(-1, in_features)
    y = torch._weight_int8pack_mm(flat, qweight, scale[:, 0].to(x.dtype))
    return y.reshape(*x.shape[:-1], qweight.shape[0])
