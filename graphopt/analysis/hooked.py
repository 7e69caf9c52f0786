"""The one hooked runner: run a model on batches with hooks attached, ending a forward early once the hooks
have what they need, and the order in which layers run found that way.

Every analysis found by running the model (block inputs, calibration statistics, the order of layers,
which layers read one tensor) goes through :func:`run_hooked`; a hook ends a forward with :class:`Stop`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import as_example_inputs


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


def layer_order(model: nn.Module, layers: dict[str, nn.Module], inputs: Any
                ) -> tuple[list[list[str]], list[str]]:
    """``layers`` in the order one call of ``model`` reaches them, those that read one tensor grouped together
    (q, k and v of an attention), and the layers it never reaches."""
    first: dict[str, Any] = {}  # the input tensors themselves: an id() of a freed tensor can be reused
    order: list[str] = []
    handles = []
    for name, layer in layers.items():
        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in first:
                first[name] = args[0] if args else None
                order.append(name)
        handles.append(layer.register_forward_pre_hook(record))
    run_hooked(model, [inputs], handles)
    groups: list[list[str]] = []
    for name in order:
        if groups and first[name] is not None and first[groups[-1][0]] is first[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, [n for n in layers if n not in first]
