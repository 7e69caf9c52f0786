"""Example inputs and model outputs: normalisation, calling, flattening and comparison."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .kv_cache import caches_off


class InputError(TypeError):
    """Example inputs have a form graphopt cannot call a model with."""


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword inputs of one model call.

    Users may pass a tensor, a tuple/list of positional args, or a dict of keyword args;
    :func:`as_example_inputs` turns each into this form.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, module: nn.Module, via: Callable[..., Any] | None = None) -> Any:
        """``module(*args, **kwargs)``, with HF KV caches off (see :mod:`graphopt.frontend.kv_cache`); ``via``:
        what runs the module (a compiled forward) in its place."""
        with caches_off(module):
            return (via or module)(*self.args, **self.kwargs)

    def to(self, device: torch.device | str) -> ExampleInputs:
        return ExampleInputs(_map_tensors(self.args, lambda t: t.to(device)),
                             _map_tensors(self.kwargs, lambda t: t.to(device)))

    @property
    def batch_size(self) -> int:
        """The leading size of the first tensor with dims (1 when there is none)."""
        first = next((t for t in [*self.args, *self.kwargs.values()] if isinstance(t, torch.Tensor) and t.dim()), None)
        return int(first.shape[0]) if first is not None else 1

    def with_batch(self, batch: int) -> ExampleInputs:
        """These inputs at batch size ``batch``: every tensor whose leading size is this batch's, its first sample
        repeated (what timing at another batch size feeds)."""
        size = self.batch_size

        def one(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0 or t.shape[0] != size:
                return t
            return t[:1].expand(batch, *t.shape[1:]).contiguous()

        return ExampleInputs(_map_tensors(self.args, one), _map_tensors(self.kwargs, one))

    def describe(self) -> str:
        parts = [describe_value(a) for a in self.args]
        parts += [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def as_example_inputs(inputs: Any) -> ExampleInputs:
    """Normalise a tensor, a tuple/list of args, a dict of kwargs or an ExampleInputs."""
    if isinstance(inputs, ExampleInputs):
        return inputs
    if isinstance(inputs, torch.Tensor):
        return ExampleInputs((inputs,), {})
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise InputError(f"example input dict keys must be argument names (str), got {bad!r}")
        return ExampleInputs((), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return ExampleInputs(tuple(inputs), {})
    raise InputError(
        f"example_inputs must be a tensor, a tuple/list of positional args or a dict of keyword args; "
        f"got {type(inputs).__name__}"
    )


_INPUT_NAME = re.compile(r"(^|_)(input_ids|ids|pixel_values|input_features|input_values|embeds)$")


def missing_inputs(module: nn.Module, inputs: ExampleInputs) -> list[str]:
    """Tensor inputs of ``module.forward`` (by their usual names: ``*_ids``, ``pixel_values``, ...) not given.

    Said when a model fails on its example inputs: a seq2seq model without ``decoder_input_ids`` fails
    deep inside with a message that does not name it.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    given = set(inputs.kwargs) | {p.name for p in params[: len(inputs.args)]}
    return [p.name for p in params if p.name not in given and _INPUT_NAME.search(p.name)
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def describe_value(value: Any) -> str:
    """``float32[2, 5]`` for a tensor, else the value's type name."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return type(value).__name__


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def flatten_outputs(output: Any, prefix: str = "output", *,
                    skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Flatten a model output (tensor, tuple, dict, HF ModelOutput, dataclass, nesting) to ``{path: tensor}``.

    Values that hold no tensors to compare (``None``, numbers, strings, HF cache objects) are left
    out; pass a list as ``skipped`` to learn the paths of the objects left out (numbers and ``None``
    are not listed).
    """
    flat: dict[str, torch.Tensor] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[path] = value
        elif isinstance(value, Mapping):  # dicts and HF ModelOutput (an OrderedDict)
            for key, item in value.items():
                visit(item, f"{path}.{key}")
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(item, f"{path}[{i}]")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name), f"{path}.{f.name}")
        elif value is not None and not isinstance(value, (bool, int, float, complex)) and skipped is not None:
            skipped.append(f"{path} ({type(value).__name__})")  # HF caches, strings, other objects

    visit(output, prefix)
    return flat


@dataclass(frozen=True)
class OutputError:
    """Error of one output against a reference: max abs and max abs relative to the reference's scale."""

    max_abs: float
    max_rel: float
    worst: str = ""
    cosine: float = 1.0  # lowest over float outputs of the mean row-wise (last-dim) cosine similarity

    def __str__(self) -> str:
        return f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}" + (f" ({self.worst})" if self.worst else "")


class OutputMismatch(ValueError):
    """Two model outputs do not have the same structure or shapes."""


def compare_outputs(got: Any, ref: Any) -> OutputError:
    """Compare two model outputs tensor by tensor.

    ``max_rel`` is ``max|got - ref| / max|ref|`` per tensor (the scale-free error used for tolerances);
    the worst tensor is named. Raises :class:`OutputMismatch` when structure or shapes differ.
    """
    g, r = flatten_outputs(got), flatten_outputs(ref)
    if g.keys() != r.keys():
        raise OutputMismatch(f"outputs differ in structure: {sorted(g)} vs {sorted(r)}")
    worst_abs, worst_rel, worst, cosine = 0.0, 0.0, "", 1.0
    for key, ref_t in r.items():
        got_t = g[key]
        if got_t.shape != ref_t.shape:
            raise OutputMismatch(f"{key}: shape {tuple(got_t.shape)} differs from {tuple(ref_t.shape)}")
        if ref_t.device.type == "meta" or got_t.device.type == "meta" or ref_t.numel() == 0:
            continue
        if not ref_t.is_floating_point() and not ref_t.is_complex():
            diff = float((got_t != ref_t).sum())
            abs_err, rel_err = diff, diff
        else:
            delta = (got_t.detach().double() - ref_t.detach().double()).abs()
            if not torch.isfinite(got_t).all():
                abs_err, rel_err = float("inf"), float("inf")
            else:
                abs_err = float(delta.max())
                scale = float(ref_t.detach().double().abs().max())
                rel_err = abs_err / scale if scale > 0 else abs_err
                if ref_t.dim() >= 1 and ref_t.shape[-1] > 1:
                    rows = torch.nn.functional.cosine_similarity(
                        got_t.detach().double().flatten(0, -2) if ref_t.dim() > 1 else got_t.detach().double()[None],
                        ref_t.detach().double().flatten(0, -2) if ref_t.dim() > 1 else ref_t.detach().double()[None],
                        dim=-1)
                    cosine = min(cosine, float(rows.mean()))
        if rel_err > worst_rel or (rel_err == worst_rel and abs_err > worst_abs):
            worst = key
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    return OutputError(worst_abs, worst_rel, worst, cosine)
