"""What loading a model spec gives (:class:`LoadedModel`) and the error it raises (:class:`ModelSpecError`),
shared by the spec resolver (:mod:`.models`) and the loaders of real pretrained models it calls."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn


class ModelSpecError(ValueError):
    """A model spec names no model graphopt can load; the message says what to give instead."""


class LoadedModel(NamedTuple):
    """What a model spec resolves to (unpacks as ``model, example_inputs, tokenizer, description``)."""

    model: nn.Module
    example_inputs: Any
    tokenizer: Any | None
    description: str


def summary(model: nn.Module) -> str:
    """``"ClassName, 4.65M parameters"``."""
    params = sum(p.numel() for p in model.parameters())
    count = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params:,}"
    return f"{type(model).__name__}, {count} parameters"
