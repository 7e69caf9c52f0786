"""Calibration statistics streamed from a model's activations (bounded memory, padding masked).

:class:`GramAccumulator` sums ``XᵀX`` in float64 over the rows of a layer's inputs, leaving out the
padding tokens of each batch (its ``attention_mask``), so nothing but a ``[in, in]`` matrix is kept.
:func:`layer_input_stats` runs calibration batches through a model and feeds the inputs of chosen
layers to one accumulator each (the statistic a quantize algorithm names), stopping each forward as soon
as all of them have been seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ..frontend.inputs import as_example_inputs
from .distributed import all_reduce_sum, my_share, rank_and_world
from .hooked import Stop, run_hooked


class Accumulator(Protocol):
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...


@runtime_checkable
class Reducible(Protocol):
    """An accumulator whose statistic is a sum: it can be gathered over processes (:mod:`.distributed`)."""

    def reduce(self) -> None: ...


Acc = TypeVar("Acc", bound=Accumulator)


class GramAccumulator:
    """Running ``Σ xᵀx`` and ``Σ x`` (float64) and the number of rows, for one layer's inputs."""

    def __init__(self, features: int) -> None:
        self.gram = torch.zeros(features, features, dtype=torch.float64)
        self.total = torch.zeros(features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (``[..., features]``); ``mask`` (``x.shape[:-1]``) marks the rows that count."""
        rows = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and mask.shape == x.shape[:-1]:
            rows = rows[mask.reshape(-1).bool()]
        rows = rows.to(device="cpu", dtype=torch.float64)
        self.gram.addmm_(rows.T, rows)  # in place: no k x k temporary
        self.total += rows.sum(dim=0)
        self.rows += rows.shape[0]

    def reduce(self) -> None:
        """The sums over every process's batches, in every process (nothing in one process)."""
        rows = torch.tensor([self.rows], dtype=torch.float64)
        all_reduce_sum(self.gram, self.total, rows)
        self.rows = int(rows.item())

    def mean(self, *, spend: bool = False) -> torch.Tensor:
        """``XᵀX / rows`` (the GPTQ Hessian up to a factor 2); ``spend``: divided in the accumulator's own memory,
        which then holds the mean, not the sum (one ``k x k`` matrix less for a solve that needs no other)."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        if spend:
            self.gram.div_(self.rows)
            self.rows = 1
            return self.gram
        return self.gram / self.rows


def mask_of(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` keyword input of one batch (``[batch, seq]``), if it has one."""
    mask = as_example_inputs(inputs).kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def layer_input_stats(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any],
                      accumulator: Callable[[int], Acc], masks: Sequence[torch.Tensor | None] | None = None
                      ) -> dict[str, Acc]:
    """One ``accumulator(in_features)`` per layer, fed the layer's first input of each batch (a convolution's
    input with its channels moved last, one row per position).

    ``model`` may be a part of a model (one block) and ``batches`` its inputs; ``masks`` then gives
    each batch's padding mask (default: each batch's ``attention_mask``). The model runs without
    autograd; each forward stops once all ``layers`` have been called, so only the part of the model
    up to them runs.

    Under ``torch.distributed`` (:mod:`.distributed`), accumulators that are sums (``reduce()``) are fed this
    process's share of the batches and reduced over the processes; others see every batch in every process.
    """
    grams = {name: accumulator(_in_features(m)) for name, m in layers.items()}
    split = bool(grams) and all(isinstance(g, Reducible) for g in grams.values()) and rank_and_world()[1] > 1
    if split:
        batches = list(batches)
        indices = my_share(range(len(batches)))
        batches = [batches[i] for i in indices]
        masks = None if masks is None else [masks[i] for i in indices]
    seen: set[str] = set()
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen:
                x = args[0]
                grams[name].add(x.movedim(1, -1) if isinstance(module, nn.Conv2d) else x, mask[0])
                seen.add(name)
            if len(seen) == len(layers):
                raise Stop
        return record

    def before(i: int, batch: Any) -> None:
        seen.clear()
        mask[0] = mask_of(batch) if masks is None else masks[i]

    run_hooked(model, batches, [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()],
               before=before)
    if split:
        for g in grams.values():
            g.reduce()  # type: ignore[union-attr]
    return grams


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.in_channels)
    if hasattr(module, "in_features"):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[0])
    raise TypeError(f"{type(module).__name__} has no in_features")
