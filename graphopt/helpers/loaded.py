"""What loading a model spec gives (:class:`LoadedModel`) and the error it raises (:class:`ModelSpecError`),
shared by the spec resolver (:mod:`.models`) and the loaders of real pretrained models it calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn


class ModelSpecError(ValueError):
    """A model spec names no model graphopt can load; the message says what to give instead."""


#: ``(split, samples, batch_size) -> batches``: calibration (``"calib"``) or held-out (``"eval"``) model inputs
#: for a model that does not read text (the two splits disjoint)
Batches = Callable[[str, int, int], list[Any]]


@dataclass(frozen=True)
class LoadedModel:
    """What a model spec resolves to. Unpacks as ``model, example_inputs, tokenizer, description``; a model
    that does not read text may also bring its own calibration and held-out data (``batches``)."""

    model: nn.Module
    example_inputs: Any
    tokenizer: Any | None
    description: str
    batches: Batches | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.example_inputs, self.tokenizer, self.description))

    def _replace(self, **changes: Any) -> LoadedModel:
        return dataclasses.replace(self, **changes)


def summary(model: nn.Module) -> str:
    """``"ClassName, 4.65M parameters"``."""
    params = sum(p.numel() for p in model.parameters())
    count = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params:,}"
    return f"{type(model).__name__}, {count} parameters"
