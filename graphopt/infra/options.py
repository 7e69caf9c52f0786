"""Declared option types and ranges: one check for pipeline text and for passes built in Python.

A pass declares each option's type on its dataclass field, and its range with ``Annotated``::

    ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.3
    alpha0: Annotated[float, Range(0, lo_open=True)] | None = None

:func:`coerce` checks a value against such an annotation (ints widen to float; NaN and infinities are
refused; ranges are checked), and :func:`check_options` runs it on every field of a constructed pass,
so ``prune(ratio=2)`` in a pipeline text and ``Prune(ratio="0.5")`` in Python fail the same way, before
any pass runs, with :class:`~graphopt.infra.text.PipelineError`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .text import PipelineError, suggest

#: nesting deeper than this in an option value is refused (lists of lists ...)
MAX_DEPTH = 16


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option; ``lo_open`` / ``hi_open`` exclude the bound itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))


def coerce(where: str, value: Any, tp: Any, depth: int = 0) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float) or raise PipelineError."""
    if depth > MAX_DEPTH:
        raise PipelineError(f"{where}: the value is nested more than {MAX_DEPTH} levels deep")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        value = coerce(where, value, inner, depth)
        for extra in extras:
            if isinstance(extra, Range) and not extra.contains(value):
                raise PipelineError(f"{where}: {value!r} is out of range; it must be {extra}")
        return value
    if origin in (Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return coerce(where, value, arm, depth)
            except PipelineError as e:
                errors.append(e)
        if len(errors) == 1:  # "X or none": X's own message says what is wrong
            raise errors[0]
        raise PipelineError(f"{where}: {_short(value)} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, (str, int, float, bool)) and value in choices:
            return value
        raise PipelineError(f"{where}: {_short(value)} is not one of {', '.join(map(str, choices))}"
                            f"{suggest(str(value), map(str, choices)) if isinstance(value, str) else ''}")
    if tp is type(None):
        if value is None:
            return None
        raise PipelineError(f"{where}: expected none, got {_short(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(where, v, item_tp, depth + 1) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a map {{key: value, ...}}, got {_short(value)}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {coerce(where, k, key_tp, depth + 1): coerce(f"{where}[{k!r}]", v, value_tp, depth + 1)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise PipelineError(f"{where}: {value!r} is not a finite number")
            return float(value)
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise PipelineError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}")


def check_options(p: Any) -> None:
    """Coerce and range-check every option of the pass ``p`` in place (its fields' annotations)."""
    hints = typing.get_type_hints(type(p), include_extras=True)
    for f in dataclasses.fields(p):
        if f.init and f.name in hints:
            setattr(p, f.name, coerce(f"{p.name or type(p).__name__}({f.name}=...)", getattr(p, f.name),
                                      hints[f.name]))


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a user object whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        inner, *extras = typing.get_args(tp)
        return f"{_type_name(inner)} {' '.join(str(e) for e in extras)}".strip()
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return f"map {_type_name(key_tp)} -> {_type_name(value_tp)}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def option_help(cls: type) -> dict[str, str]:
    """Each option's help: the comment that ends its field's line (or the ``#:`` lines above it) in the source.

    The source is the one place the options are declared, so their help is written there, beside each
    (as Sphinx reads ``#:`` attribute comments). Inherited fields come from the base classes' sources.
    """
    import inspect
    import io
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # built at run time (a function pass): no source to read
            continue
        own = {f.name for f in dataclasses.fields(klass)}
        above: list[str] = []
        for line in source.splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#:"):
                above.append(stripped[2:].strip())
                continue
            name = stripped.split(":", 1)[0].strip()
            if name in own and ":" in stripped and not stripped.startswith(("def ", "@")):
                try:
                    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(stripped + "\n").readline)
                                if t.type == tokenize.COMMENT]
                except tokenize.TokenError:  # a default spread over several lines
                    comments = []
                trailing = [c.lstrip("#").strip() for c in comments[-1:]]
                trailing = [c for c in trailing if not c.startswith(("type:", "noqa"))]
                text = " ".join(above + trailing).strip()
                if text:
                    out[name] = text
            above = []
    return out
