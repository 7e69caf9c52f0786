"""Calibration data checked against the example inputs before any pass reads it.

Calibration data is an iterable of model inputs, each of the same form as ``example_inputs``. The
mistakes users make (one dict instead of a list of dicts, a bare tensor whose rows would become 1-D
batches, raw strings, other keys, other dtypes, other widths) each get one :class:`InputError` that
names the batch, what was expected and what was found.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .inputs import ExampleInputs, InputError, as_example_inputs, describe_value

#: batches checked for form (a DataLoader is not read to its end)
CHECKED_BATCHES = 64


def check_calibration(calib: Iterable[Any], example: ExampleInputs, model: nn.Module, *, run: bool = False,
                      what: str = "calib") -> None:
    """Raise :class:`InputError` for the first calibration batch that does not fit ``example``.

    Keyword inputs may differ from the example's where ``model.forward`` allows it (an optional
    ``attention_mask``). With ``run``, the first batch whose sizes differ from the example's beyond
    the batch dim is also run once, so that a wrong width fails here, named, not deep inside a pass.
    """
    if isinstance(calib, torch.Tensor):
        raise InputError(f"{what} is one tensor {describe_value(calib)}: iterating it would give its rows as 1-D batches. "
                         f"Pass a list of batches: {what}=[x] or {what}=list(x.split(16))")
    if isinstance(calib, Mapping):
        raise InputError(f"{what} is one dict of inputs; pass a list of such dicts: {what}=[batch]")
    if isinstance(calib, (str, bytes)):
        raise InputError(f"{what} is a string; pass a list of model inputs (tokenize texts first)")
    run_checked = not run
    accepts = _keywords(model)
    for i, raw in enumerate(itertools.islice(calib, CHECKED_BATCHES)):
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (torch.Tensor, Mapping, tuple, list, ExampleInputs)):
            raise InputError(f"{what} batch {i} is a {type(raw).__name__}; each batch is a model input of the "
                             f"same form as example_inputs ({example.describe()}); tokenize texts first")
        batch = as_example_inputs(raw)
        problem, resized = _mismatch(batch, example, accepts)
        if problem:
            raise InputError(f"{what} batch {i} does not match example_inputs: {problem}\n"
                             f"  example_inputs: {example.describe()}\n  batch {i}: {batch.describe()}")
        if resized and not run_checked:
            run_checked = True
            _run(model, batch, i, example, what)


def _keywords(model: nn.Module) -> tuple[set[str], set[str]] | None:
    """(keyword inputs forward() takes, those without a default); None if it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, {p.name for p in params if p.name in names and p.default is p.empty}


def _mismatch(batch: ExampleInputs, example: ExampleInputs,
              accepts: tuple[set[str], set[str]] | None) -> tuple[str, bool]:
    """(what differs in form, '' if nothing; whether sizes beyond dim 0 differ)."""
    if len(batch.args) != len(example.args):
        return f"{len(batch.args)} positional inputs instead of {len(example.args)}", False
    if accepts is not None and (batch.kwargs or example.kwargs):
        names, required = accepts
        unknown = [k for k in batch.kwargs if k not in names]
        missing = [k for k in example.kwargs if k in required and k not in batch.kwargs]
        if unknown or missing:
            parts = ([f"forward() takes no input {', '.join(map(repr, unknown))}"] if unknown else []) + (
                [f"lacks {', '.join(map(repr, missing))}, which forward() requires"] if missing else [])
            return "; ".join(parts), False
    pairs = [(f"input {k}", a, b) for k, (a, b) in enumerate(zip(batch.args, example.args))]
    pairs += [(repr(k), batch.kwargs[k], v) for k, v in example.kwargs.items() if k in batch.kwargs]
    resized = False
    for name, got, want in pairs:
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            return f"{name} is {_describe(got)} where example_inputs has {_describe(want)}", False
        if not isinstance(want, torch.Tensor):
            continue
        if _kind(got) != _kind(want) or (got.is_floating_point() and got.dtype != want.dtype):
            return (f"{name} has dtype {str(got.dtype).removeprefix('torch.')} where example_inputs has "
                    f"{str(want.dtype).removeprefix('torch.')} (convert it: batch[...].to(...))"), False
        if got.dim() != want.dim():
            return f"{name} has {got.dim()} dims {list(got.shape)} where example_inputs has {list(want.shape)}", False
        resized |= got.shape[1:] != want.shape[1:]
    return "", resized


def _run(model: nn.Module, batch: ExampleInputs, i: int, example: ExampleInputs, what: str) -> None:
    try:
        with torch.no_grad():
            batch.call(model)
    except Exception as e:  # any failure: the batch does not fit this model
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{what} batch {i} does not run through the model ({type(e).__name__}: {first}); its "
                         f"sizes differ from example_inputs'\n  example_inputs: {example.describe()}\n"
                         f"  batch {i}: {batch.describe()}") from None


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else ("complex" if t.is_complex() else "integer")


def _describe(value: Any) -> str:
    return f"a {'tensor ' if isinstance(value, torch.Tensor) else ''}{describe_value(value)}"
