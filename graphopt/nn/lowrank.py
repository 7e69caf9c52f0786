"""``LowRankLinear`` / ``LowRankConv2d``: a layer stored as two smaller ones, ``up(down(x))`` (``factorize``).

``down`` (``in -> rank``, no bias) and ``up`` (``rank -> out``, the original bias) are plain ``nn.Linear``
children, so every other pass sees ordinary layers: ``quantize`` packs both (GPTQ included), ``heal`` trains
them, the ONNX export is two MatMuls. A module of its own rather than an ``nn.Sequential`` because the
state-dict names change either way (``q_proj.0.weight`` is no more loadable by transformers than
``q_proj.down.weight``), and a class says what the pair is: the report, ``factorize``'s refusal to factorize
a factor again, and ``go.load`` read it. ``LowRankConv2d`` is the same pair for a 1x1 convolution (a Linear
over channels at every position): two 1x1 ``nn.Conv2d`` children, the stride and padding on ``down``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``x ↦ up(down(x))``: a rank-``rank`` stand-in for an ``in_features -> out_features`` Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear rank {rank} must lie in [1, {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """The layer computing ``x (up @ down)ᵀ + bias`` from ``up`` (``[out, rank]``) and ``down`` (``[rank, in]``)."""
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None)
        layer.to(device=down.device, dtype=down.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` product of the factors (what the layer computes, as one matrix)."""
        return self.up.weight @ self.down.weight

    def graphopt_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """``x ↦ up(down(x))`` with 1x1 convolutions: a rank-``rank`` stand-in for a 1x1, ungrouped ``nn.Conv2d``.

    ``down`` carries the original stride, padding and padding mode: a pointwise map commutes with them (a
    padded position gives ``0`` after ``down`` and the bias after ``up``, as it gave the bias before).
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, bias: bool = True,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        if not 1 <= rank <= min(in_channels, out_channels):
            raise ValueError(f"LowRankConv2d rank {rank} must lie in [1, {min(in_channels, out_channels)}]")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.down = nn.Conv2d(in_channels, rank, 1, stride=stride, padding=padding, padding_mode=padding_mode,
                              bias=False)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     like: nn.Conv2d) -> LowRankConv2d:
        """The pair for the 1x1 convolution ``like`` from ``up`` (``[out, rank]``) and ``down`` (``[rank, in]``)."""
        padding = 0 if isinstance(like.padding, str) else like.padding  # "same" / "valid" pad nothing at 1x1
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, stride=like.stride,
                    padding=padding, padding_mode=like.padding_mode)
        layer.to(device=down.device, dtype=down.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down[:, :, None, None])
            layer.up.weight.copy_(up[:, :, None, None])
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    # the convolution's geometry, for model code that reads it (HF MobileNetV2's TF padding reads the stride)
    kernel_size = property(lambda self: self.down.kernel_size)
    stride = property(lambda self: self.down.stride)
    padding = property(lambda self: self.down.padding)
    dilation = property(lambda self: self.down.dilation)
    groups = property(lambda self: self.down.groups)
    padding_mode = property(lambda self: self.down.padding_mode)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` product of the factors (the 1x1 kernel, as one matrix)."""
        return self.up.weight.flatten(1) @ self.down.weight.flatten(1)

    def graphopt_spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "rank": self.rank,
                "bias": self.up.bias is not None, "stride": list(self.down.stride),
                "padding": list(self.down.padding), "padding_mode": self.down.padding_mode}

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


#: the module classes ``factorize`` builds
LOW_RANK = (LowRankLinear, LowRankConv2d)


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank that stores fewer weights than the dense layer: ``r (in + out) < in x out``."""
    return (in_features * out_features - 1) // (in_features + out_features)
