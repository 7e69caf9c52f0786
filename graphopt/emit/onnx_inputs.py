"""ONNX export inputs: the example call as named tensors, and dynamic axes (naming, checks, grown sizes)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..frontend.inputs import ExampleInputs, InputError
from .onnx_report import first_lines

log = logging.getLogger(__name__)

#: ``{input name: {axis: dim name}}`` (a list of axes names them ``<input>_dim<axis>``), or ``'auto'``.
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]] | str


def _key_suffix(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("idx", "key", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "".join(f"_{p}" for p in parts)


@dataclass
class CallLayout:
    """The example call as named tensor leaves of ``forward``'s bound arguments (signature order)."""

    signature: inspect.Signature
    arguments: dict[str, tuple[list[Any], Any]]  # bound name -> (leaves, treespec)
    slots: list[tuple[str, int]]  # one per tensor input: (bound name, leaf index)
    names: list[str]
    tensors: list[torch.Tensor]
    simple: bool  # no *args/**kwargs and every tensor is a whole named argument (no nesting)

    def bind(self, tensors: Sequence[torch.Tensor]) -> inspect.BoundArguments:
        leaves = {name: list(lv) for name, (lv, _) in self.arguments.items()}
        for (name, i), t in zip(self.slots, tensors):
            leaves[name][i] = t
        values = {n: pytree.tree_unflatten(leaves[n], spec) for n, (_, spec) in self.arguments.items()}
        return inspect.BoundArguments(self.signature, values)  # type: ignore[arg-type]

    def call_inputs(self, tensors: Sequence[torch.Tensor]) -> ExampleInputs:
        bound = self.bind(tensors)
        return ExampleInputs(tuple(bound.args), dict(bound.kwargs))


def call_layout(model: nn.Module, inputs: ExampleInputs) -> CallLayout:
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as e:
        raise InputError(f"the example inputs ({inputs.describe()}) do not fit "
                         f"{type(model).__name__}.forward{signature}: {e}") from None
    arguments, slots, names, tensors, simple = {}, [], [], [], True
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        simple = simple and kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        with_path, spec = pytree.tree_flatten_with_path(value)
        arguments[name] = ([leaf for _, leaf in with_path], spec)
        for i, (path, leaf) in enumerate(with_path):
            if not isinstance(leaf, torch.Tensor):
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:  # **kwargs: the key is the input's name
                label = str(getattr(path[0], "key", name)) + _key_suffix(path[1:])
            else:
                label = name + _key_suffix(path)
            simple = simple and not path
            slots.append((name, i))
            names.append(label)
            tensors.append(leaf)
    if len(set(names)) != len(names):
        raise InputError(f"two example inputs would get the same ONNX input name: {names}")
    return CallLayout(signature, arguments, slots, names, tensors, simple)


class FlatCall(nn.Module):
    """Exports ``model`` as ``forward(*tensors)``: the original call is rebuilt from flat tensors.

    Used when inputs go through ``*args``/``**kwargs`` or containers, which torch.export cannot mark
    dynamic directly.
    """

    def __init__(self, model: nn.Module, layout: CallLayout) -> None:
        super().__init__()
        self.model = model
        self.call_layout = layout

    def forward(self, *tensors: torch.Tensor) -> Any:
        bound = self.call_layout.bind(tensors)
        return self.model(*bound.args, **bound.kwargs)


# --- dynamic axes ---------------------------------------------------------------------------------

def _auto_axes(layout: CallLayout) -> dict[str, dict[int, str]]:
    """Axis 0 of every tensor input is ``batch``; axis 1 of 2-D integer inputs (ids, masks) is ``seq``."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(layout.names, layout.tensors):
        spec: dict[int, str] = {}
        if t.dim() >= 1 and t.shape[0] >= 2:
            spec[0] = "batch"
        if t.dim() == 2 and not t.is_floating_point() and not t.is_complex() and t.shape[1] >= 2:
            spec[1] = "seq"
        if spec:
            axes[name] = spec
    skipped = [n for n, t in zip(layout.names, layout.tensors) if t.dim() >= 1 and t.shape[0] < 2]
    if skipped:
        log.warning("dynamic_axes='auto': batch axis of %s left static (size < 2 in the example inputs)",
                    skipped)
    return axes


def normalise_axes(dynamic_axes: DynamicAxes | None, layout: CallLayout) -> dict[str, dict[int, str]]:
    if dynamic_axes is None:
        return {}
    if isinstance(dynamic_axes, str):
        if dynamic_axes != "auto":
            raise ValueError(f"dynamic_axes must be a dict {{input name: {{axis: name}}}} or 'auto', "
                             f"got {dynamic_axes!r}")
        return _auto_axes(layout)
    if not isinstance(dynamic_axes, Mapping):
        raise TypeError(f"dynamic_axes must be a dict {{input name: {{axis: name}}}} or 'auto', "
                        f"got {type(dynamic_axes).__name__}")
    shapes = dict(zip(layout.names, (tuple(t.shape) for t in layout.tensors)))
    out: dict[str, dict[int, str]] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, where first seen)
    for name, spec in dynamic_axes.items():
        if name not in shapes:
            raise ValueError(f"dynamic_axes names unknown input {name!r}; the model's tensor inputs are "
                             f"{', '.join(repr(n) for n in layout.names) or '(none)'}")
        if isinstance(spec, Mapping):
            items = list(spec.items())
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            items = [(axis, f"{name}_dim{axis}") for axis in spec]
        else:
            raise TypeError(f"dynamic_axes[{name!r}] must map axis -> name (e.g. {{0: 'batch'}}) or list "
                            f"axes, got {spec!r}")
        shape, axes = shapes[name], {}
        for axis, dim in items:
            if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
                raise ValueError(f"dynamic_axes[{name!r}]: axis {axis!r} is out of range for an input of "
                                 f"shape {list(shape)}")
            if not isinstance(dim, str) or not dim.isidentifier():
                raise ValueError(f"dynamic_axes[{name!r}][{axis}]: the dim name must be an identifier "
                                 f"such as 'batch' or 'seq', got {dim!r}")
            axis %= len(shape)
            size = shape[axis]
            if size < 2:
                raise ValueError(f"dynamic axis {dim!r} (axis {axis} of {name!r}) has size {size} in the "
                                 "example inputs; torch.export specialises sizes 0 and 1, so give example "
                                 "inputs with size >= 2 on every dynamic axis")
            first = sizes.setdefault(dim, (size, f"axis {axis} of {name!r}"))
            if first[0] != size:
                raise ValueError(f"dynamic axis {dim!r} is {first[1]} (size {first[0]}) and axis {axis} of "
                                 f"{name!r} (size {size}); axes that share a name must have the same size")
            axes[axis] = dim
        if axes:
            out[name] = axes
    return out


def dynamic_shapes(axes: dict[str, dict[int, str]], layout: CallLayout, flat: bool) -> Any:
    """``torch.export`` dynamic shapes: one ``Dim`` per dim name, shared across inputs."""
    if not axes:
        return None
    dims = {d: torch.export.Dim(d) for spec in axes.values() for d in spec.values()}
    per_input = [{a: dims[d] for a, d in axes[n].items()} if n in axes else None for n in layout.names]
    if flat:
        return {"tensors": tuple(per_input)}
    by_arg = dict(zip((name for name, _ in layout.slots), per_input))
    return {name: by_arg.get(name) for name in layout.arguments}


#: how the re-check grows dynamic axes: first ``batch+1`` / ``seq+3`` (axis 0 / others); if torch itself
#: rejects those sizes (e.g. a reshape needs an even batch), twice the example sizes.
_GROWTH: tuple[Callable[[int, int], int], ...] = (lambda size, axis: size + (1 if axis == 0 else 3),
                                                   lambda size, axis: 2 * size)


def _resized(axes: dict[str, dict[int, str]], layout: CallLayout,
             grow: Callable[[int, int], int]) -> list[torch.Tensor]:
    """The example tensors grown on their dynamic axes to ``grow(size, axis)``.

    Values are repeated cyclically along the grown axes, so token ids and masks stay valid.
    """
    new_size: dict[str, int] = {}
    for name, spec in axes.items():
        t = layout.tensors[layout.names.index(name)]
        for axis, dim in spec.items():
            new_size.setdefault(dim, grow(t.shape[axis], axis))
    out = []
    for name, t in zip(layout.names, layout.tensors):
        for axis, dim in axes.get(name, {}).items():
            index = torch.arange(new_size[dim], device=t.device) % t.shape[axis]
            t = t.index_select(axis, index)
        out.append(t)
    return out


def grown_case(model: nn.Module, layout: CallLayout, axes: dict[str, dict[int, str]],
                notes: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Inputs with other sizes on the dynamic axes that torch accepts, and torch's outputs on them."""
    failures = []
    for grow in _GROWTH:
        tensors = _resized(axes, layout, grow)
        try:
            with torch.no_grad():
                out = layout.call_inputs(tensors).call(model)
        except Exception as e:  # noqa: BLE001 - the model itself rejects these sizes: try others
            failures.append(f"{describe_inputs(layout.names, tensors)} ({first_lines(e, 1)})")
            continue
        return tensors, [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    notes.append("dynamic axes not re-checked at other sizes: torch fails on " + "; ".join(failures))
    log.warning("%s", notes[-1])
    return None


def describe_inputs(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{n}{list(t.shape)}" for n, t in zip(names, tensors))
