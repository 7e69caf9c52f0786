"""``LinearBlock``: a linear map standing in for a span of a model's blocks (``replace_blocks``).

It takes the blocks' call signature (hidden states first, or as ``hidden_states=``, then whatever
else the model passes) and answers in the blocks' output structure: the mapped hidden states alone,
or a tuple whose other items are ``None`` or inputs passed through (T5 hands each block the position
bias that the previous one returned). ``outputs`` describes that structure as JSON:

- ``"hidden"``: the block returns a tensor;
- a list: ``"hidden"`` for the mapped states, ``None``, ``["arg", i]`` (positional input ``i``) or
  ``["kwarg", name]`` for each item of the tuple.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

Outputs = str | list[Any]


def _check_outputs(outputs: Outputs) -> None:
    if outputs == "hidden":
        return
    ok = isinstance(outputs, list) and outputs.count("hidden") == 1 and all(
        item in ("hidden", None) or (isinstance(item, list) and len(item) == 2 and item[0] in ("arg", "kwarg"))
        for item in outputs)
    if not ok:
        raise ValueError(f"LinearBlock outputs must be 'hidden' or a list of 'hidden', None, ['arg', i] and "
                         f"['kwarg', name] items, got {outputs!r}")


class LinearBlock(nn.Module):
    """``h ↦ h Tᵀ + c`` in place of blocks, with the blocks' inputs and output structure."""

    def __init__(self, features: int, bias: bool = True, outputs: Outputs = "hidden",
                 replaces: int = 1) -> None:
        super().__init__()
        _check_outputs(outputs)
        self.linear = nn.Linear(features, features, bias=bias)
        self.outputs = outputs
        self.replaces = replaces  # how many blocks it stands for (for reports)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            hidden = args[0]
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            hidden = kwargs["hidden_states"]
        else:
            raise TypeError("LinearBlock takes the hidden states first or as hidden_states=")
        mapped = self.linear(hidden)
        if self.outputs == "hidden":
            return mapped
        out = []
        for item in self.outputs:
            if item == "hidden":
                out.append(mapped)
            elif item is None:
                out.append(None)
            elif item[0] == "arg":
                out.append(args[item[1]] if item[1] < len(args) else None)
            else:
                out.append(kwargs.get(item[1]))
        return tuple(out)

    #: the layout of graphopt_spec's kwargs; bump it (and add graphopt_spec_upgrade) when they change
    graphopt_spec_version: ClassVar[int] = 1

    def graphopt_spec(self) -> dict[str, Any]:
        return {"features": self.linear.in_features, "bias": self.linear.bias is not None,
                "outputs": self.outputs, "replaces": self.replaces}

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}, outputs={self.outputs!r}"


def output_structure(out: Any, args: tuple, kwargs: dict) -> Outputs:
    """The ``outputs`` description of a block that returned ``out`` when called with ``args``/``kwargs``.

    Raises ``ValueError`` when an output item is neither the hidden states, ``None``, nor an input
    passed through (something the block computes, which a linear map cannot stand in for).
    """
    if isinstance(out, torch.Tensor):
        return "hidden"
    if not isinstance(out, tuple) or not out or not isinstance(out[0], torch.Tensor):
        raise ValueError(f"the block returns a {type(out).__name__}, not a tensor or a tuple starting with one")
    items: list[Any] = ["hidden"]
    for k, item in enumerate(out[1:], 1):
        if item is None:
            items.append(None)
            continue
        found = next((["arg", i] for i, a in enumerate(args) if a is item), None)
        found = found or next((["kwarg", name] for name, v in kwargs.items() if v is item), None)
        if found is None and isinstance(item, torch.Tensor):
            found = next((["arg", i] for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                          and a.shape == item.shape and torch.equal(a, item)), None)
        if found is None:
            raise ValueError(f"output {k} of the block ({type(item).__name__}) is computed by the block, "
                             "not passed through; a linear map cannot stand in for it")
        items.append(found)
    return items
