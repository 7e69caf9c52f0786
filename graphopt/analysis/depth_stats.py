"""Calibration statistics for depth rewrites, streamed batch by batch (bounded memory, padding masked).

- :func:`span_distances`: the angular distance ``arccos(cos(x_l, x_{l+n})) / π`` between the hidden
  states before and after every span of ``n`` consecutive blocks, averaged over tokens ("The
  Unreasonable Ineffectiveness of the Deeper Layers", Gromov et al. 2024). Only the last ``n + 1``
  block boundaries of one batch are held.
- :class:`LinearMapStats`: the float64 Gram matrices ``[X 1]ᵀ[X 1]`` and ``[X 1]ᵀY`` of a least-squares
  map ``Y ≈ X T + c`` (ReplaceMe, Shopkhoev et al. 2025), and a bounded sample of rows for refining it
  under another objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .blocks import BlockList, first_tensor, hidden_of
from .calibration import mask_of
from .hooked import Stop, run_hooked


def rows_of(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (``[..., features]``) that ``mask`` (``x.shape[:-1]``) keeps; all when no mask fits."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        rows = rows[mask.reshape(-1).bool()]
    return rows


def masked_batches(batches: Iterable[Any], mask: list[torch.Tensor | None]) -> Iterable[Any]:
    """``batches``, setting ``mask[0]`` to each one's attention mask before it is yielded (for hooks)."""
    for batch in batches:
        mask[0] = mask_of(batch)
        yield batch


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``arccos(cos(a, b)) / π`` in [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def boundary_shapes(model: torch.nn.Module, blocks: BlockList, example: Any) -> list[tuple[int, ...]]:
    """The shape of the hidden states entering each block on ``example``, then the last block's output's:
    a span ``s .. s+n-1`` keeps the shape iff items ``s`` and ``s+n`` are equal."""
    modules = [model.get_submodule(name) for name in blocks.names]
    shapes: dict[int, tuple[int, ...]] = {}

    def before(k: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            shapes.setdefault(k, tuple(hidden_of(args, kwargs)[0].shape))
        return hook

    def after(module: torch.nn.Module, args: tuple, out: Any) -> None:
        shapes.setdefault(len(modules), tuple(first_tensor(out).shape))
        raise Stop

    handles = [m.register_forward_pre_hook(before(k), with_kwargs=True) for k, m in enumerate(modules)]
    handles.append(modules[-1].register_forward_hook(after))
    run_hooked(model, [example], handles)
    return [shapes.get(k, ()) for k in range(len(modules) + 1)]


def span_distances(model: torch.nn.Module, blocks: BlockList, batches: Iterable[Any], n: int) -> list[float]:
    """Mean angular distance across each span of ``n`` blocks; item ``s`` is blocks ``s .. s+n-1`` (NaN for a
    span whose output differs in shape from its input)."""
    modules = [model.get_submodule(name) for name in blocks.names]
    spans = len(modules) - n + 1
    sums = torch.zeros(spans, dtype=torch.float64)
    count = [0]
    boundary: dict[int, torch.Tensor] = {}  # boundary k = the input of block k (k = len: the last output)
    mask: list[torch.Tensor | None] = [None]

    def before(k: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if k == 0:
                boundary.clear()
                boundary[0] = rows_of(hidden_of(args, kwargs)[0], mask[0])
                count[0] += boundary[0].shape[0]
        return hook

    def after(k: int):
        def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
            boundary[k + 1] = rows_of(first_tensor(out), mask[0])
            start = k + 1 - n
            if start >= 0 and boundary[start].shape == boundary[k + 1].shape:
                sums[start] += angular_distance(boundary[start], boundary[k + 1]).sum()
            elif start >= 0:
                sums[start] = math.nan  # the span changes the hidden shape: no distance (and no cut)
            boundary.pop(start, None)
            if k == len(modules) - 1:
                raise Stop
        return hook

    handles = []
    for k, module in enumerate(modules):
        handles.append(module.register_forward_pre_hook(before(k), with_kwargs=True))
        handles.append(module.register_forward_hook(after(k)))

    run_hooked(model, masked_batches(batches, mask), handles)
    if count[0] == 0:
        raise ValueError("the calibration data never reached the blocks")
    return (sums / count[0]).tolist()


class LinearMapStats:
    """Streamed least squares for ``Y ≈ X T (+ c)``: Gram matrices in float64 and a bounded row sample."""

    def __init__(self, features_in: int, features_out: int, *, bias: bool, sample_bytes: int = 1 << 28) -> None:
        self.bias = bias
        width = features_in + int(bias)
        self.xtx = torch.zeros(width, width, dtype=torch.float64)
        self.xty = torch.zeros(width, features_out, dtype=torch.float64)
        self.rows = 0
        self.max_rows = max(1, sample_bytes // (4 * (features_in + 2 * features_out))) if sample_bytes else 0
        self.sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._sampled = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor) -> None:
        """Add rows: inputs ``x``, targets ``y`` and ``base`` (what the map's output is added to: ``Y ≈ base + X T``)."""
        x64 = x.to(device="cpu", dtype=torch.float64)
        if self.bias:
            x64 = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], 1)
        self.xtx += x64.T @ x64
        self.xty += x64.T @ (y - base).to(device="cpu", dtype=torch.float64)
        self.rows += x.shape[0]
        room = self.max_rows - self._sampled
        if room > 0:  # the first rows up to the budget, a stride through each batch
            step = max(1, math.ceil(x.shape[0] / room)) if x.shape[0] > room else 1
            keep = slice(0, x.shape[0], step)
            part = (x[keep].float().cpu(), y[keep].float().cpu(), base[keep].float().cpu())
            self.sample.append(part)
            self._sampled += part[0].shape[0]

    def solve(self, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(T [in, out], c [out] or None)`` minimising ``Σ |base + X T + c - Y|²`` (ridge relative to the mean diagonal)."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached the blocks")
        a = self.xtx.clone()
        a += ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=torch.float64)
        t = torch.linalg.solve(a, self.xty)
        if self.bias:
            return t[:-1].float(), t[-1].float()
        return t.float(), None

    def samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sampled ``(X, Y, base)`` rows."""
        return tuple(torch.cat(parts) for parts in zip(*self.sample))  # type: ignore[return-value]
