"""Quantized linear layers and their packed weight formats.

Formats (symmetric, one scale per output row and group of ``group_size`` input columns; a last
group shorter than ``group_size`` when ``in_features`` is not a multiple of it):

- ``int8``: one signed byte per weight, codes in [-127, 127], ``scale = max|w| / 127`` per row
  (``group_size=0``: per channel) or per group.
- ``int4``: codes in [-8, 7], stored offset by +8 as unsigned nibbles, two per byte: column ``2j``
  in the low nibble of byte ``j``, column ``2j + 1`` in the high one; ``scale = max|w| / 7``.
- ``ternary``: codes in {-1, 0, 1} (BitNet b1.58's absmean rounding: ``scale = mean|w|``), stored
  offset by +1 in 2 bits, four per byte: column ``4j + i`` at bits ``2i`` of byte ``j``.

:class:`QuantLinear` holds the packed codes (``qweight``, a ``uint8``/``int8`` buffer) and the scales
(``scale``, ``[out, groups]``); ``backend`` picks how it runs: ``"torch"`` (dequantize, then
``F.linear``: the reference) or ``"int8_mm"`` (torch's packed int8 CPU kernel, int8 per channel
only); ``"auto"`` takes the fastest one measured (today ``"torch"``; Triton on CUDA is next).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Scheme = Literal["int8", "int4", "ternary"]
SCHEMES: tuple[str, ...] = ("int8", "int4", "ternary")
BITS = {"int8": 8, "int4": 4, "ternary": 2}
QMAX = {"int8": 127, "int4": 7}
_PER_BYTE = {"int8": 1, "int4": 2, "ternary": 4}
BACKENDS = ("auto", "torch", "int8_mm")


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, g]``, the last group zero-padded."""
    out, k = w.shape
    g = k if group_size <= 0 else group_size
    pad = n_groups(k, group_size) * g - k
    return F.pad(w, (0, pad)).reshape(out, -1, g)


def quantize_weight(w: torch.Tensor, scheme: Scheme, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes (``int8`` tensor ``[out, in]``) and scales (``[out, groups]``, float32)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    k = w.shape[1]
    wg = grouped(w.detach().float(), group_size)
    if scheme == "ternary":
        valid = grouped(torch.ones_like(w, dtype=torch.float32), group_size)
        scale = (wg.abs().sum(-1) / valid.sum(-1)).clamp_min(1e-8)
        codes = (wg / scale[..., None]).round().clamp(-1, 1)
    else:
        qmax = QMAX[scheme]
        scale = (wg.abs().amax(-1) / qmax).clamp_min(1e-8)
        codes = (wg / scale[..., None]).round().clamp(-qmax - (scheme == "int4"), qmax)
    return codes.reshape(w.shape[0], -1)[:, :k].to(torch.int8), scale


def pack(codes: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes ``[out, in]`` (int8) -> the stored layout (see the module docstring)."""
    if scheme == "int8":
        return codes.to(torch.int8).contiguous()
    per, offset, bits = _PER_BYTE[scheme], (8 if scheme == "int4" else 1), BITS[scheme]
    out, k = codes.shape
    padded = F.pad(codes.to(torch.int16) + offset, (0, (-k) % per)).reshape(out, -1, per)
    packed = torch.zeros(padded.shape[:2], dtype=torch.int16)
    for i in range(per):
        packed |= padded[..., i] << (bits * i)
    return packed.to(torch.uint8)


def unpack(packed: torch.Tensor, scheme: Scheme, in_features: int) -> torch.Tensor:
    """The stored layout -> codes ``[out, in_features]`` (int8)."""
    if scheme == "int8":
        return packed[:, :in_features].to(torch.int8)
    per, offset, bits = _PER_BYTE[scheme], (8 if scheme == "int4" else 1), BITS[scheme]
    p = packed.to(torch.int16)
    parts = [(p >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    codes = torch.stack(parts, -1).reshape(packed.shape[0], -1)[:, :in_features] - offset
    return codes.to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Codes ``[out, in]`` times their group's scale -> weights ``[out, in]``."""
    k = codes.shape[1]
    values = grouped(codes.to(torch.float32), group_size) * scale.to(torch.float32)[..., None]
    return values.reshape(codes.shape[0], -1)[:, :k].to(dtype)


class QuantLinear(nn.Module):
    """A Linear layer with packed low-bit weights (see the module docstring for the formats)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: Scheme = "int8",
                 group_size: int = 0, backend: str = "auto", dtype: torch.dtype | str | None = None,
                 device: Any = None) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: one scale per output channel), got {group_size}")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.get_default_dtype())
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.backend = scheme, group_size, backend
        per = _PER_BYTE[scheme]
        stored = torch.int8 if scheme == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, math.ceil(in_features / per), dtype=stored,
                                                    device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups(in_features, group_size), dtype=dtype,
                                                 device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, scheme: Scheme, group_size: int,
                    backend: str = "auto", codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        """A layer for ``weight`` (``[out, in]``) on its device and dtype: its round-to-nearest codes, or the
        ``(codes, scales)`` given (from GPTQ, say)."""
        out, k = weight.shape
        layer = cls(k, out, bias is not None, scheme=scheme, group_size=group_size, backend=backend,
                    dtype=weight.dtype, device=weight.device)
        layer.set_codes(*(codes if codes is not None else quantize_weight(weight, scheme, group_size)))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight = pack(codes.cpu(), self.scheme).to(self.qweight.device)
        self.scale = scale.to(device=self.scale.device, dtype=self.scale.dtype)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.scheme, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.group_size, dtype or self.scale.dtype)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def resolved_backend(self, x: torch.Tensor) -> str:
        """``auto`` is ``torch``: on the CPUs measured here torch's packed int8 kernel (``int8_mm``) ran
        10x slower than an fp32 matmul at 32 x 384 x 1536 (benchmarks/README.md), so it is opt-in."""
        return "torch" if self.backend == "auto" else self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolved_backend(x) == "int8_mm":
            if self.scheme != "int8" or self.group_size > 0:
                raise ValueError("backend='int8_mm' runs int8 weights with one scale per channel only")
            flat = x.reshape(-1, self.in_features)
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale[:, 0].to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        w = self.dequantized_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def graphopt_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "scheme": self.scheme, "group_size": self.group_size, "backend": self.backend,
                "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size > 0 else "per channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, {group}, backend={self.backend}")
