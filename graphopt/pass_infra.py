"""The pass contract: ``Pass``, ``PassResult``, ``Diagnostic`` and the pass registry.

A pass is a dataclass whose fields are its options, with ``run(program, am) -> PassResult``.
``register_pass`` registers a class, or turns a plain function ``fn(program, am, *, opt=...)``
into one (TVM's single decorator for function and class passes).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .analysis import AnalysisManager
    from .program import Program


@dataclass
class Diagnostic:
    """Something a pass wants the user to know: usually a module it left alone, and why."""

    target: str
    message: str
    level: str = "skipped"  # "skipped" | "info" | "warning"

    def __str__(self) -> str:
        return f"[{self.level}] {self.target}: {self.message}"


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, analyses it kept valid, counts and diagnostics."""

    modified: bool
    preserved: frozenset[str] = frozenset()
    stats: dict[str, float] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: The pass changed output shapes on purpose (e.g. ``prune(outputs=true)``): verification then
    #: checks only that the model runs and stays finite.
    changes_outputs: bool = False

    def skip(self, target: str, why: str) -> None:
        """Record that ``target`` was left alone because ``why``."""
        self.diagnostics.append(Diagnostic(target, why, "skipped"))

    def note(self, target: str, message: str, level: str = "info") -> None:
        self.diagnostics.append(Diagnostic(target, message, level))


class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are the pass's options.

    Class attributes a pass may set:

    - ``tolerance``: the largest relative output error (``max|new-old| / max|old|``) against the
      previous program that verification accepts; ``None`` marks a lossy pass (shapes and finiteness
      are still checked).
    - ``needs_calibration``: the pass reads ``program.calib`` and fails clearly without it.
    - ``needs_original``: the pass reads ``program.original`` (the model given to ``optimize``, e.g. as a
      distillation teacher); ``optimize(inplace=True)`` then keeps a copy of it.
    """

    name: ClassVar[str] = ""
    tolerance: ClassVar[float | None] = 1e-5
    needs_calibration: ClassVar[bool] = False
    needs_original: ClassVar[bool] = False

    def run(self, program: Program, am: AnalysisManager) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def options(self, *, all: bool = False) -> dict[str, Any]:
        """This pass's option values (only those that differ from the defaults unless ``all``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if all or value != default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        from .pipeline import format_pass

        return format_pass(self)

    @classmethod
    def doc(cls) -> str:
        """The first line of the pass's docstring."""
        text = inspect.getdoc(cls) or ""
        return text.strip().splitlines()[0] if text.strip() else ""


_REGISTRY: dict[str, type[Pass]] = {}


class PassRegistrationError(ValueError):
    """A pass was registered wrongly (duplicate name, bad signature)."""


def register_pass(name: str, *, tolerance: float | None | object = ..., needs_calibration: bool | None = None,
                  replace: bool = False) -> Callable[[Any], Any]:
    """Register a pass class, or turn ``fn(program, am, *, opt=default, ...)`` into one, under ``name``."""
    if not name.isidentifier():
        raise PassRegistrationError(f"pass name {name!r} must be an identifier (letters, digits, _)")

    def deco(obj: Any) -> Any:
        if name in _REGISTRY and not replace and _REGISTRY[name].__qualname__ != getattr(obj, "__qualname__", ""):
            raise PassRegistrationError(f"a pass named {name!r} is already registered "
                                        f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}); "
                                        f"pick another name or pass replace=True")
        cls = _class_from_function(name, obj) if inspect.isfunction(obj) else obj
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PassRegistrationError(f"{obj!r} is neither a go.Pass subclass nor a function")
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        cls.name = name
        if tolerance is not ...:
            cls.tolerance = tolerance  # type: ignore[assignment]
        if needs_calibration is not None:
            cls.needs_calibration = needs_calibration
        _REGISTRY[name] = cls
        return cls

    return deco


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
    from .pipeline import PipelineError, suggest

    _load_builtin_passes()
    if name not in _REGISTRY:
        raise PipelineError(f"unknown pass {name!r}{suggest(name, _REGISTRY)}")
    return _REGISTRY[name]


def list_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-in passes are loaded first)."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (registers the built-in passes)
