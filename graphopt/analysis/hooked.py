"""The one hooked runner: run a model on batches with hooks attached, ending a forward early once the hooks
have what they need, and the order in which layers run found that way.

Every analysis found by running the model (block inputs, calibration statistics, the order of layers,
which layers read one tensor) goes through :func:`run_hooked`; a hook ends a forward with :class:`Stop`.
The call order of a Program's modules on its example inputs is the cached analysis ``"call_order"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import as_example_inputs
from .manager import AnalysisManager, Analyzable, register_analysis


class Stop(Exception):
    """Raised by a hook to end a forward early (caught by :func:`run_hooked`)."""


def run_hooked(model: nn.Module, batches: Iterable[Any], handles: list, *,
               before: Callable[[int, Any], None] | None = None, after: Callable[[int, Any], None] | None = None,
               device: torch.device | None = None) -> None:
    """Run ``model`` on each batch without autograd (a hook may end a forward with :class:`Stop`), then
    remove the hooks ``handles``. ``before(i, batch)`` / ``after(i, batch)`` run around each batch's forward
    (to reset or collect what the hooks gather); ``device`` moves each batch first."""
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                inputs = as_example_inputs(batch)
                if device is not None:
                    inputs = inputs.to(device)
                if before is not None:
                    before(i, batch)
                with contextlib.suppress(Stop):
                    inputs.call(model)
                if after is not None:
                    after(i, batch)
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class CallOrder:
    """The order in which one forward first calls a model's modules, and which first inputs are one tensor.

    ``names``: the modules called, in order; ``reads[i]``: a number for the tensor ``names[i]`` first read
    (equal numbers: the same tensor object, as q, k and v of an attention read one; -1: no tensor input).
    """

    names: tuple[str, ...]
    reads: tuple[int, ...]
    missed: tuple[str, ...]  # the modules hooked that the forward never called

    def groups(self, names: Iterable[str]) -> tuple[list[list[str]], list[str]]:
        """``names`` in call order, consecutive ones that read one tensor grouped together (the layers GPTQ and
        SmoothQuant treat as one), and those of ``names`` never called."""
        wanted = set(names)
        groups: list[list[str]] = []
        last = -1
        for name, read in zip(self.names, self.reads):
            if name not in wanted:
                continue
            if groups and read >= 0 and read == last:
                groups[-1].append(name)
            else:
                groups.append([name])
            last = read
        called = set(self.names)
        return groups, [n for n in names if n not in called]


def call_order(model: nn.Module, modules: dict[str, nn.Module], inputs: Any) -> CallOrder:
    """Run ``model`` once on ``inputs`` and record when each of ``modules`` is first called, and on what."""
    first: dict[str, Any] = {}  # the input tensors themselves: an id() of a freed tensor can be reused
    order: list[str] = []
    handles = []
    for name, module in modules.items():
        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in first:
                first[name] = args[0] if args and isinstance(args[0], torch.Tensor) else None
                order.append(name)
        handles.append(module.register_forward_pre_hook(record))
    run_hooked(model, [inputs], handles)
    numbers: dict[int, int] = {}  # id() -> number, while every tensor is still held by ``first``
    reads = tuple(-1 if first[n] is None else numbers.setdefault(id(first[n]), len(numbers)) for n in order)
    return CallOrder(tuple(order), reads, tuple(n for n in modules if n not in first))


@register_analysis("call_order")
def _call_order(program: Analyzable, am: AnalysisManager) -> CallOrder:
    """Every submodule of the Program's model in the order its example inputs call them (:func:`call_order`)."""
    return call_order(program.module, dict(program.module.named_modules(remove_duplicate=False)),
                      program.example_inputs)
