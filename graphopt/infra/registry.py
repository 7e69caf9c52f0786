"""The registries of passes and presets, by name.

``register_pass`` registers a pass class, or turns a plain function ``fn(program, am, *, opt=...)``
into one (TVM's single decorator for function and class passes). Presets are named pipeline texts.
Built-in passes (:mod:`graphopt.passes`) are loaded on first look-up.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .contract import Pass, PassResult
from .text import PipelineError, suggest

if TYPE_CHECKING:
    from ..analysis.manager import AnalysisManager
    from .program import Program

_REGISTRY: dict[str, type[Pass]] = {}


class PassRegistrationError(ValueError):
    """A pass was registered wrongly (duplicate name, bad signature)."""


def register_pass(name: str, *, tolerance: float | None | object = ..., needs_calibration: bool | None = None,
                  change: str | None = None, replace: bool = False,
                  choices: Iterable[dict[str, Any]] | None = None, slot: str | None = None,
                  stage: int | None = None, repairs: bool | None = None) -> Callable[[Any], Any]:
    """Register a pass class, or turn ``fn(program, am, *, opt=default, ...)`` into one, under ``name``.

    ``choices`` (option sets, mildest first), ``slot`` and ``stage`` put the pass in the search space of
    ``optimize(goal=...)``, ``repairs`` makes it the search's repair step (see :class:`~graphopt.infra.contract.Pass`)."""
    if not name.isidentifier():
        raise PassRegistrationError(f"pass name {name!r} must be an identifier (letters, digits, _)")
    options = None if choices is None else tuple(dict(c) for c in choices)
    if options is not None and not all(all(isinstance(k, str) for k in c) for c in options):
        raise PassRegistrationError(f"{name}: choices= takes option dicts keyed by option name, got {choices!r}")

    def deco(obj: Any) -> Any:
        if name in _REGISTRY and not replace and _REGISTRY[name].__qualname__ != getattr(obj, "__qualname__", ""):
            raise PassRegistrationError(f"a pass named {name!r} is already registered "
                                        f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}); "
                                        f"pick another name or pass replace=True")
        cls = _class_from_function(name, obj) if inspect.isfunction(obj) else obj
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PassRegistrationError(f"{obj!r} is neither a go.Pass subclass nor a function")
        if "__dataclass_fields__" not in vars(cls):  # a subclass of a dataclass pass adds its own fields
            cls = dataclass(cls)
        cls.name = name
        if tolerance is not ...:
            cls.tolerance = tolerance  # type: ignore[assignment]
        if needs_calibration is not None:
            cls.needs_calibration = needs_calibration
        if change is not None:
            cls.change = change
        if options is not None:
            _check_choices(name, cls, options)
            cls.choices = options
        if slot is not None:
            cls.slot = slot
        if stage is not None:
            cls.stage = stage
        if repairs is not None:
            if repairs and cls.choices:
                raise PassRegistrationError(f"{name}: a repairing pass has no choices (the search adds it to "
                                            "candidates); register it with choices= or repairs=True, not both")
            cls.repairs = repairs
        _REGISTRY[name] = cls
        return cls

    return deco


def _check_choices(name: str, cls: type[Pass], choices: tuple[dict[str, Any], ...]) -> None:
    """Every declared choice must name the pass's own options with values it accepts: found at registration,
    not in the middle of a search."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for choice in choices:
        unknown = [k for k in choice if k not in fields]
        if unknown:
            raise PassRegistrationError(f"{name}: choice {choice!r} names no option {unknown[0]!r}"
                                        f"{suggest(unknown[0], fields)}")
        try:
            cls(**choice)
        except (TypeError, ValueError) as e:
            raise PassRegistrationError(f"{name}: choice {choice!r} is not a valid configuration: {e}") from None


def _class_from_function(name: str, fn: Callable[..., Any]) -> type[Pass]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if len(params) < 2 or any(p.kind is not p.KEYWORD_ONLY for p in params[2:]):
        raise PassRegistrationError(
            f"function pass {fn.__name__} must look like fn(program, am, *, option=default, ...)")
    hints = inspect.get_annotations(fn, eval_str=True)
    fields = []
    for p in params[2:]:
        if p.default is p.empty:
            raise PassRegistrationError(f"option {p.name!r} of {fn.__name__} needs a default value")
        fields.append((p.name, hints.get(p.name, type(p.default)), field(default=p.default)))

    def run(self: Pass, program: Program, am: AnalysisManager) -> PassResult:
        return fn(program, am, **self.options(all=True))

    cls = dataclasses.make_dataclass(
        f"{fn.__name__}_pass", fields, bases=(Pass,),
        namespace={"run": run, "__doc__": fn.__doc__, "__module__": fn.__module__},
    )
    cls.__qualname__ = fn.__qualname__
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; raises PipelineError naming the closest name."""
    load_builtin_passes()
    if name not in _REGISTRY:
        raise PipelineError(f"unknown pass {name!r}{suggest(name, _REGISTRY)}")
    return _REGISTRY[name]


def list_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-in passes are loaded first)."""
    load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def load_builtin_passes() -> None:
    # lazy: graphopt.passes imports this registry to register itself, so it can only be loaded on first use
    import graphopt.passes  # noqa: F401


_PRESETS: dict[str, str] = {}


def register_preset(name: str, text: str) -> None:
    """Register ``name`` as shorthand for the pipeline ``text``."""
    _PRESETS[name] = text


def list_presets() -> dict[str, str]:
    return dict(sorted(_PRESETS.items()))


def get_preset(name: str) -> str | None:
    """The pipeline text of preset ``name``, or ``None`` when there is no such preset."""
    return _PRESETS.get(name)
