"""Quantized layers: :class:`QuantLinear`, :class:`QuantConv2d` and :class:`QuantEmbedding` hold packed codes
and scales (the one storage of :class:`PackedLayer`: a ``rows x width`` matrix of codes, one scale per row or per
group of ``group_size`` along it).

The packed formats (int8, int4 two per byte, ternary four per byte) and the op that runs them live in
:mod:`graphopt.kernels.quant`. A layer holds ``qweight`` (``int8``/``uint8`` buffer), ``scale``
(``[out, groups]``), an optional ``smooth`` (``[in]``: SmoothQuant's per-input-channel factor, the
input is multiplied by it first) and ``activations`` (``"none"``: weight-only; ``"per_tensor"``: w8a8,
the input quantized to uint8 per call, one scale per tensor; ``"per_token"``: w8a8 with one int8 scale
per row). ``backend`` picks how it runs: ``"torch"`` (the reference: dequantize, then a float matmul),
``"int_mm"`` (torch's integer GEMM on CPU: w8a8 and weight-only int8 per channel), ``"int8_mm"`` (torch's
packed int8 CPU kernel, weight-only int8 per channel; :mod:`graphopt.kernels.quant_cpu`) or ``"triton"``
(graphopt's kernels, :mod:`graphopt.kernels.quant_triton`: CUDA, or CPU under ``TRITON_INTERPRET=1``);
``"auto"`` takes Triton on CUDA tensors and, on CPU, the path measured fastest for the layer's shape.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.kernels.quant import (
    ACTIVATIONS,
    BITS,
    CODE_RANGE,
    PER_BYTE,
    QMAX,
    SCHEMES,
    W8A8_ACTIVATIONS,
    W8A8_QMAX,
    dequantize,
    dequantize_packed,
    dequantize_rows,
    grouped,
    n_groups,
    needs_op,
    pack,
    quant_linear,
    quant_linear_impl,
    unpack,
)
from graphopt.kernels.quant_cpu import CPU_BACKENDS, why_not
from graphopt.kernels.quant_dispatch import auto_cpu_backend


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


Scheme = Literal["int8", "int4", "ternary"]
BACKENDS = ("auto", "torch", "int_mm", "onednn", "int8_mm", "triton")

__all__ = ["ACTIVATIONS", "BACKENDS", "BITS", "CODE_RANGE", "QMAX", "SCHEMES", "W8A8_ACTIVATIONS", "W8A8_QMAX",
           "PackedLayer", "QuantConv2d", "QuantEmbedding", "QuantLinear", "dequantize", "grouped", "n_groups", "pack",
           "quantize_weight", "unpack"]


def quantize_weight(w: torch.Tensor, scheme: Scheme, group_size: int, qmax: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes (``int8`` tensor ``[out, in]``) and scales (``[out, groups]``, float32).

    ``qmax`` narrows the int8 / int4 codes to ``[-qmax, qmax]`` (:data:`W8A8_QMAX` for w8a8 on x86 CPUs).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    k = w.shape[1]
    w = w.detach().float()
    scale = weight_scales(w, scheme, group_size, qmax)
    codes = round_codes(grouped(w, group_size), scale[..., None], scheme, qmax)
    return codes.reshape(w.shape[0], -1)[:, :k].to(torch.int8), scale


#: int4 scales are searched over these fractions of ``max|w| / qmax`` besides 1 (which clips nothing): 8/7 puts
#: the largest negative weight on code -8, below 1 clips the extremes to round the rest more finely (the MSE
#: clipping of llama.cpp's k-quants and AWQ's clip search; Lin et al. 2024)
CLIP_FRACTIONS = tuple(0.5 + 0.025 * i for i in range(20)) + (1.0625, 8 / 7)


def weight_scales(w: torch.Tensor, scheme: Scheme, group_size: int, qmax: int | None = None, *,
                  importance: torch.Tensor | None = None) -> torch.Tensor:
    """The scale of each group of each row of ``w`` (``[out, groups]``, ``w``'s dtype): ``max|w| / qmax`` for
    int8; for int4 the one of :data:`CLIP_FRACTIONS` of it whose rounding error over the group is least
    (weighted by ``importance``, ``[in]``, e.g. a Hessian's diagonal: GPTQ's); the mean ``|w|`` over the group's
    real columns for ternary (the zero padding of a short last group does not count). Round to nearest and GPTQ
    both take their scales from here. Rows are independent: a large ``w`` is taken 16 MiB of rows at a time
    (int4's search of clipping fractions holds a few copies of what it is given)."""
    rows = max(1, (16 << 20) // max(1, w[0].numel() * w.element_size())) if w.dim() == 2 else w.shape[0]
    if w.shape[0] > rows:
        return torch.cat([weight_scales(w[i:i + rows], scheme, group_size, qmax, importance=importance)
                          for i in range(0, w.shape[0], rows)])
    wg = grouped(w, group_size)
    if scheme == "ternary":
        valid = grouped(torch.ones_like(w), group_size).sum(-1)
        return (wg.abs().sum(-1) / valid).clamp_min(1e-8)
    top = (wg.abs().amax(-1) / (qmax or QMAX[scheme])).clamp_min(1e-8)
    if scheme != "int4":
        return top
    if importance is None:
        weight = torch.ones_like(w[:1])
    else:  # a floor, so that inputs never seen (dead columns) still count a little
        weight = importance.to(w).clamp_min(0)[None]
        weight = weight + 1e-3 * weight.mean().clamp_min(1e-30)
    weight = grouped(weight, group_size)

    def error(scale: torch.Tensor) -> torch.Tensor:
        return ((wg - round_codes(wg, scale[..., None], scheme, qmax) * scale[..., None]).square() * weight).sum(-1)

    best, least = top, error(top)  # ties keep the unclipped scale
    for fraction in CLIP_FRACTIONS:
        scale = top * fraction
        candidate = error(scale)
        better = candidate < least
        best, least = torch.where(better, scale, best), torch.where(better, candidate, least)
    return best


def round_codes(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme, qmax: int | None = None) -> torch.Tensor:
    """``w / scale`` rounded to the nearest code of ``scheme`` (``[-qmax, qmax]`` when given), in ``w``'s dtype."""
    lo, hi = (-qmax, qmax) if qmax else CODE_RANGE[scheme]
    return (w / scale).round().clamp(lo, hi)


def packed_value_problems(qweight: torch.Tensor, scale: torch.Tensor, scheme: str, rows: int, width: int,
                          group_size: int, qmax: int | None = None) -> list[str]:
    """What is wrong with packed codes and scales for ``rows x width`` weights of ``scheme`` (``[]``: nothing):
    sizes that disagree with the layer's, codes outside the scheme's range, scales that are not finite and
    positive. What a file can hold that no quantizer writes, checked when a saved model is loaded."""
    want = (rows, math.ceil(width / PER_BYTE[scheme]))
    if tuple(qweight.shape) != want:
        return [f"packed codes are {list(qweight.shape)}, a {rows} x {width} {scheme} layer packs to {list(want)}"]
    if tuple(scale.shape) != (rows, n_groups(width, group_size)):
        return [f"scales are {list(scale.shape)}, expected {[rows, n_groups(width, group_size)]}"]
    out = []
    lo, hi = (-qmax, qmax) if qmax else CODE_RANGE[scheme]
    codes = unpack(qweight, scheme, width)
    bad = int(((codes < lo) | (codes > hi)).sum())
    if bad:
        out.append(f"{bad} code(s) outside {scheme}'s range [{lo}, {hi}]")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        out.append(f"{int((~torch.isfinite(scale) | (scale <= 0)).sum())} scale(s) not finite and positive")
    return out


class PackedLayer(nn.Module):
    """A layer whose weights are packed codes (``qweight``, ``[rows, packed width]``) and their scales (``scale``,
    ``[rows, groups]``): what metrics, load validation and the report read of every quantized layer."""

    qweight: torch.Tensor
    scale: torch.Tensor
    scheme: str
    group_size: int

    def _register_packed(self, rows: int, width: int, scheme: str, dtype: torch.dtype, device: Any) -> None:
        stored = torch.int8 if scheme == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(rows, math.ceil(width / PER_BYTE[scheme]), dtype=stored,
                                                    device=device))
        self.register_buffer("scale", torch.ones(rows, n_groups(width, self.group_size), dtype=dtype, device=device))

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Pack ``codes`` (``[rows, width]`` int8) and store ``scale`` in the layer's device and dtype."""
        self.qweight = pack(codes.cpu(), self.scheme).to(self.qweight.device)
        self.scale = scale.to(device=self.scale.device, dtype=self.scale.dtype)

    @property
    def weight_count(self) -> int:
        """How many weights the packed codes stand for (what a parameter count counts for this layer)."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        """Bytes of the codes, scales and any other buffer the packed weights need."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def value_problems(self) -> list[str]:
        """What is wrong with the packed codes and scales (``[]``: nothing)."""
        raise NotImplementedError


class QuantLinear(PackedLayer):
    """A Linear layer with packed low-bit weights (formats: :mod:`graphopt.kernels.quant`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: Scheme = "int8",
                 group_size: int = 0, backend: str = "auto", activations: str = "none", smooth: bool = False,
                 dtype: torch.dtype | str | None = None, device: Any = None) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"unknown activations {activations!r}; choose from {', '.join(ACTIVATIONS)}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: one scale per output channel), got {group_size}")
        if activations in W8A8_ACTIVATIONS and (scheme != "int8" or group_size > 0):
            raise ValueError(f"activations={activations!r} (w8a8) needs int8 weights with one scale per channel "
                             f"(got scheme={scheme}, group_size={group_size})")
        if backend in CPU_BACKENDS and (problem := why_not(backend, scheme, group_size, activations)):
            raise ValueError(problem)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.get_default_dtype())
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.backend, self.activations = scheme, group_size, backend, activations
        self._register_packed(out_features, in_features, scheme, dtype, device)
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, device=device) if smooth else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, scheme: Scheme, group_size: int,
                    backend: str = "auto", codes: tuple[torch.Tensor, torch.Tensor] | None = None,
                    activations: str = "none", smooth: torch.Tensor | None = None) -> QuantLinear:
        """A layer for ``weight`` (``[out, in]``) on its device and dtype: its round-to-nearest codes, or the
        ``(codes, scales)`` given (from GPTQ, say). With ``smooth`` (``[in]``), the layer computes
        ``(x * smooth) @ (W / smooth).T``: the codes are those of ``W / smooth``. w8a8 layers round their
        weights to 7 bits (:data:`W8A8_QMAX`) unless ``codes`` are given."""
        out, k = weight.shape
        layer = cls(k, out, bias is not None, scheme=scheme, group_size=group_size, backend=backend,
                    activations=activations, smooth=smooth is not None, dtype=weight.dtype, device=weight.device)
        if smooth is not None:
            layer.smooth.copy_(smooth)
            weight = weight / smooth.to(weight.dtype)
        qmax = W8A8_QMAX if activations in W8A8_ACTIVATIONS else None
        layer.set_codes(*(codes if codes is not None else quantize_weight(weight, scheme, group_size, qmax)))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.scheme, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer applies to its (unsmoothed) input, ``[out, in]``."""
        w = dequantize_rows(self.qweight, self.scale, self.scheme, self.group_size, self.in_features)
        if self.smooth is not None:
            w = w * self.smooth.to(torch.float32)
        return w.to(dtype or self.scale.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, built on each read, for code that reads a layer's weight itself (PyTorch's
        ``nn.MultiheadAttention`` passes ``out_proj.weight`` to its kernel; HF models read ``.weight.dtype``).
        It computes what the layer does; ``forward`` never uses it. Read-only."""
        return self.dequantized_weight()

    @property
    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def resolved_backend(self, x: torch.Tensor) -> str:
        """``auto``: ``triton`` on CUDA tensors when Triton is installed; on CPU the fastest path for this
        layer and input shape as measured on this machine (:mod:`graphopt.kernels.quant_dispatch`; the
        reference where none is faster)."""
        if self.backend != "auto":
            return self.backend
        if x.is_cuda:
            return "triton" if triton_available() else "torch"
        if x.device.type != "cpu":
            return "torch"
        return auto_cpu_backend(x, self.qweight, self.scale, self.scheme, self.group_size, self.in_features,
                                self.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x * self.smooth.to(x.dtype)
        backend = self.resolved_backend(x)
        run = quant_linear if needs_op(x, backend) else quant_linear_impl
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)  # eager: no-op casts cost
        y = run(x, self.qweight, scale, self.scheme, self.group_size, self.in_features, self.activations, backend)
        if self.bias is None:
            return y
        return y + (self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype))

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change.
    #: 2: w8a8's per-tensor activation mode is named ``"per_tensor"`` (``"dynamic"`` in version 1)
    graphopt_spec_version: ClassVar[int] = 2

    @staticmethod
    def graphopt_spec_upgrade(kwargs: dict[str, Any], version: int) -> dict[str, Any]:
        """Constructor kwargs of a spec saved in an older version."""
        if version < 2 and kwargs.get("activations") == "dynamic":
            kwargs = {**kwargs, "activations": "per_tensor"}
        return kwargs

    def graphopt_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "scheme": self.scheme, "group_size": self.group_size, "backend": self.backend,
                "activations": self.activations, "smooth": self.smooth is not None,
                "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def value_problems(self) -> list[str]:
        qmax = W8A8_QMAX if self.activations in W8A8_ACTIVATIONS else None
        out = packed_value_problems(self.qweight, self.scale, self.scheme, self.out_features, self.in_features,
                                    self.group_size, qmax)
        if self.smooth is not None and not (bool(torch.isfinite(self.smooth).all()) and bool((self.smooth > 0).all())):
            out.append("smoothing factors not finite and positive")
        return out

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size > 0 else "per channel"
        acts = f", activations={self.activations}" if self.activations != "none" else ""
        smooth = ", smoothed" if self.smooth is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, {group}{acts}{smooth}, backend={self.backend}")


class QuantConv2d(PackedLayer):
    """A Conv2d layer with packed low-bit weights, weight-only: each output channel's ``in / groups x kh x kw``
    weights are one row of codes (QuantLinear's layout, groups of ``group_size`` along the row), dequantized on
    each call; activations stay in float. Depthwise layers (rows of ``kh x kw``) take one scale per row."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *,
                 scheme: Scheme = "int8", group_size: int = 0, dtype: torch.dtype | str | None = None,
                 device: Any = None) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: one scale per output channel), got {group_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be multiples of "
                             f"groups {groups}")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.get_default_dtype())
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.scheme, self.group_size = scheme, group_size
        self.width = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._register_packed(out_channels, self.width, scheme, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, scheme: Scheme, group_size: int,
                  codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantConv2d:
        """A layer for ``conv`` (zero padding) on its device and dtype: round-to-nearest codes of its weight as
        ``[out, in / groups * kh * kw]`` rows, or the ``(codes, scales)`` given."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d pads with zeros; this layer pads with {conv.padding_mode!r}")
        w = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, scheme=scheme, group_size=group_size, dtype=w.dtype,
                    device=w.device)
        layer.set_codes(*(codes if codes is not None else quantize_weight(w.reshape(w.shape[0], -1), scheme,
                                                                          group_size)))
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer applies, ``[out, in / groups, kh, kw]``."""
        w = dequantize_packed(self.qweight, self.scale.to(dtype or self.scale.dtype), self.scheme, self.group_size,
                              self.width)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, built on each read (for code that reads a convolution's weight). Read-only."""
        return self.dequantized_weight()

    @property
    def weight_count(self) -> int:
        return self.out_channels * self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, self.dequantized_weight(x.dtype), bias, self.stride, self.padding, self.dilation,
                        self.groups)

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change
    graphopt_spec_version: ClassVar[int] = 1

    def graphopt_spec(self) -> dict[str, Any]:
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": padding,
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "scheme": self.scheme, "group_size": self.group_size,
                "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def value_problems(self) -> list[str]:
        return packed_value_problems(self.qweight, self.scale, self.scheme, self.out_channels, self.width,
                                     self.group_size)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size > 0 else "per channel"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, {group}")


class QuantEmbedding(PackedLayer):
    """An embedding table stored as packed int8 / int4 rows with per-row (or per-row-group) scales.

    A lookup gathers the packed rows of the ids, then unpacks and scales only those rows, so the
    table stays packed in memory. ``weight`` (the dequantized table, built on each access) is there
    for code that reads an embedding's dtype or shape; it is not what ``forward`` uses.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 scheme: Scheme = "int8", group_size: int = 0, dtype: torch.dtype | str | None = None,
                 device: Any = None) -> None:
        super().__init__()
        if scheme not in ("int8", "int4"):
            raise ValueError(f"embedding tables quantize to int8 or int4, not {scheme!r}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: one scale per row), got {group_size}")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.get_default_dtype())
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scheme, self.group_size = scheme, group_size
        self._register_packed(num_embeddings, embedding_dim, scheme, dtype, device)

    @classmethod
    def from_embedding(cls, table: nn.Embedding, *, scheme: Scheme, group_size: int) -> QuantEmbedding:
        w = table.weight.detach()
        layer = cls(table.num_embeddings, table.embedding_dim, table.padding_idx, scheme=scheme,
                    group_size=group_size, dtype=w.dtype, device=w.device)
        layer.set_codes(*quantize_weight(w, scheme, group_size))
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_rows(self.qweight, self.scale, self.scheme, self.group_size, self.embedding_dim,
                               self.scale.dtype)

    @property
    def weight_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8" and self.group_size <= 0:  # one scale per row: two lookups, a cast, a product
            return F.embedding(ids, self.qweight).to(self.scale.dtype) * F.embedding(ids, self.scale)
        flat = ids.reshape(-1)
        rows = unpack(self.qweight.index_select(0, flat), self.scheme, self.embedding_dim)
        values = dequantize(rows, self.scale.index_select(0, flat), self.group_size, self.scale.dtype)
        return values.reshape(*ids.shape, self.embedding_dim)

    def value_problems(self) -> list[str]:
        return packed_value_problems(self.qweight, self.scale, self.scheme, self.num_embeddings,
                                     self.embedding_dim, self.group_size)

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change
    graphopt_spec_version: ClassVar[int] = 1

    def graphopt_spec(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "scheme": self.scheme, "group_size": self.group_size,
                "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size > 0 else "per row"
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}, {group}"
