"""How w8a8 layers quantize their inputs at run time: one definition that the reference, the Triton kernels
and the CPU integer paths all use, so that every backend multiplies the same integers."""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_quantize_uint8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX ``DynamicQuantizeLinear``: ``(codes, scale, zero_point)``, codes as float32 in [0, 255].

    ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zero_point = round(-min / scale)``, codes
    ``round(x / scale) + zero_point`` saturated, rounding half to even (as ONNX specifies).
    """
    xf = x.to(torch.float32)
    lo, hi = xf.amin().clamp(max=0), xf.amax().clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 255)
    return torch.clamp(torch.round(xf / scale) + zero, 0, 255), scale, zero


def per_token_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes per row of the last dim: ``(codes as float32 in [-128, 127], scale [..., 1])``.

    ``scale = max|x_row| / 127.5`` (half the int8 range), the convention of compressed-tensors' dynamic
    per-token activations, so that a checkpoint in that format computes what this layer does.
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.5
    return torch.clamp(torch.round(xf / scale), -128, 127), scale
