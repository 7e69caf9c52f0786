"""Cached analyses of a Program, invalidated by what each pass declares it preserves (MLIR's model)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from torch import nn

from ..frontend.inputs import ExampleInputs


class Analyzable(Protocol):
    """What an analysis reads of a program (:class:`graphopt.Program` is one): its module and inputs."""

    module: nn.Module
    example_inputs: ExampleInputs

log = logging.getLogger(__name__)

AnalysisFn = Callable[[Analyzable, "AnalysisManager"], Any]

_ANALYSES: dict[str, AnalysisFn] = {}

#: Put this in ``PassResult.preserved`` to keep every cached analysis.
PRESERVE_ALL: frozenset[str] = frozenset({"*"})


class AnalysisError(KeyError):
    """An analysis name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Register ``fn(program, am) -> value`` as the analysis ``name``."""

    def deco(fn: AnalysisFn) -> AnalysisFn:
        _ANALYSES[name] = fn
        return fn

    return deco


def list_analyses() -> list[str]:
    return sorted(_ANALYSES)


class AnalysisManager:
    """Computes analyses on demand and caches them until a pass invalidates them."""

    def __init__(self, program: Analyzable) -> None:
        self.program = program
        self._cache: dict[str, Any] = {}
        self.compute_seconds: dict[str, float] = {}

    def get(self, name: str) -> Any:
        """Return the cached analysis ``name``, computing it first if needed."""
        if name in self._cache:
            return self._cache[name]
        fn = _ANALYSES.get(name)
        if fn is None:
            from difflib import get_close_matches

            close = get_close_matches(name, _ANALYSES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(_ANALYSES))}"
            raise AnalysisError(f"unknown analysis {name!r}{hint}")
        start = time.perf_counter()
        value = fn(self.program, self)
        self.compute_seconds[name] = time.perf_counter() - start
        log.debug("analysis %s computed in %.3fs", name, self.compute_seconds[name])
        self._cache[name] = value
        return value

    def cached(self, name: str) -> bool:
        return name in self._cache

    def invalidate(self, preserved: Iterable[str] = ()) -> list[str]:
        """Drop every cached analysis not in ``preserved``; return the names dropped."""
        keep = set(preserved)
        if "*" in keep:
            return []
        dropped = [n for n in self._cache if n not in keep]
        for n in dropped:
            del self._cache[n]
        return dropped

    def clear(self) -> None:
        self._cache.clear()
