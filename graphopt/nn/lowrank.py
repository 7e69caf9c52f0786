"""``LowRankLinear``: a Linear layer stored as two smaller ones, ``up(down(x))`` (``factorize``).

``down`` (``in -> rank``, no bias) and ``up`` (``rank -> out``, the original bias) are plain ``nn.Linear``
children, so every other pass sees ordinary layers: ``quantize`` packs both (GPTQ included), ``heal`` trains
them, the ONNX export is two MatMuls. A module of its own rather than an ``nn.Sequential`` because the
state-dict names change either way (``q_proj.0.weight`` is no more loadable by transformers than
``q_proj.down.weight``), and a class says what the pair is: the report, ``factorize``'s refusal to factorize
a factor again, and ``go.load`` read it.
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


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank that stores fewer weights than the dense layer: ``r (in + out) < in x out``."""
    return (in_features * out_features - 1) // (in_features + out_features)
