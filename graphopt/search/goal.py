"""``Goal``: what the user wants of ``optimize(model, goal=...)``, as constraints and one objective.

    go.Goal(quality=0.99, speedup=3, runtime="onnxruntime")
    go.Goal.parse("quality>=0.99,speedup>=3,runtime=onnxruntime")     # the same goal, as the CLI takes it
    go.Goal(ppl=1.05, objective="size")                               # the smallest model at perplexity +5%

Constraints: ``quality`` (the report's figure against the original, at least: embedding cosine, top-1 or
next-token agreement), ``ppl`` (the perplexity ratio, at most; language models), ``speedup`` (over the original
on ``runtime``, at least; the worst over ``batches`` x ``threads``; of greedy ``generate()`` with ``decode=N``;
under ``torch.compile`` with ``compile=true``, decoding over a static KV cache: :mod:`graphopt.compiled`),
``size`` (weight bytes relative to the
original, at most). The objective is the figure the search maximises (``speedup``, ``quality``) or minimises
(``size``) among the candidates that meet every constraint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..infra.pipeline import parse_value, split_top
from ..infra.text import format_value, suggest

Objective = Literal["speedup", "size", "quality"]
Runtime = Literal["torch", "onnxruntime"]


class GoalError(ValueError):
    """A goal that cannot be searched (contradictory, impossible, or missing what it needs): said before any work."""


@dataclass(frozen=True)
class Goal:
    """Constraints and one objective for ``optimize(model, inputs, goal=...)`` (see the module docstring)."""

    quality: float | None = None  # the report's quality figure, at least (0 < q <= 1)
    ppl: float | None = None  # perplexity ratio to the original, at most (>= 1)
    speedup: float | None = None  # speed-up over the original on `runtime`, at least (the worst shape)
    size: float | None = None  # weight bytes / the original's, at most (0 < s <= 1)
    objective: Objective = "speedup"
    runtime: Runtime = "torch"
    batches: tuple[int, ...] = (1, 8)  # batch sizes timed (the example's first sample repeated)
    threads: tuple[int, ...] = ()  # thread counts timed (empty: torch's current count)
    max_time: float = 1800.0  # seconds; the search keeps its best so far and stops
    trials: int = 8  # combinations measured end to end after the single changes
    passes: tuple[str, ...] = ()  # the passes searched (empty: every pass that declares choices, and heal)
    heal: int = 2  # measured candidates whose quality floor binds measured again with the repairing pass
    refine: int = 1  # choices measured between a family's last that meets the quality floor and first that misses
    tie: float = 0.02  # speed-ups, or size reductions, within this fraction of the best are equal: the higher quality wins
    decode: int = 0  # runtime=torch: time greedy generate() of this many new tokens from the example (0: one forward)
    compile: bool = False  # runtime=torch: time under torch.compile (decode=: a static KV cache, a graph a step)
    confirm: int = 3  # speedup objective: the best this many measured points rebuilt and timed again together
    plans: int = 2  # per-layer plans measured (a pass's value chosen layer by layer against the floor; 0: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batches", tuple(int(b) for b in _as_tuple(self.batches)))
        object.__setattr__(self, "threads", tuple(int(t) for t in _as_tuple(self.threads)))
        object.__setattr__(self, "passes", tuple(str(p) for p in _as_tuple(self.passes)))
        problems = []
        if self.quality is not None and not 0 < self.quality <= 1:
            problems.append(f"quality={self.quality} must be in (0, 1]: it is an agreement with the original")
        if self.ppl is not None and self.ppl < 1:
            problems.append(f"ppl={self.ppl} must be >= 1: it is the perplexity ratio to the original")
        if self.speedup is not None and self.speedup <= 0:
            problems.append(f"speedup={self.speedup} must be > 0")
        if self.size is not None and not 0 < self.size <= 1:
            problems.append(f"size={self.size} must be in (0, 1]: it is the weight bytes relative to the original")
        if self.objective not in ("speedup", "size", "quality"):
            problems.append(f"objective={self.objective!r}: choose speedup, size or quality")
        if self.runtime not in ("torch", "onnxruntime"):
            problems.append(f"runtime={self.runtime!r}: choose torch or onnxruntime")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"batches={list(self.batches)}: give one or more batch sizes >= 1")
        if any(t < 1 for t in self.threads):
            problems.append(f"threads={list(self.threads)}: thread counts are >= 1")
        if self.max_time <= 0 or min(self.trials, self.heal, self.refine, self.confirm, self.plans) < 0:
            problems.append("max_time must be > 0 seconds, trials, heal, refine, confirm and plans >= 0")
        if self.decode < 0:
            problems.append(f"decode={self.decode}: the new tokens a timed generate() makes, >= 1 (0: time a forward)")
        if self.decode and self.runtime != "torch":
            problems.append("decode= times generate(), which only runtime=torch has: drop runtime= or decode=")
        if self.decode and not self.needs_latency:
            problems.append("decode= times generate(): give speedup>= or objective=speedup with it")
        if self.compile and self.runtime != "torch":
            problems.append("compile=true times the model under torch.compile, which only runtime=torch has: "
                            "drop runtime= or compile=")
        if self.compile and not self.needs_latency:
            problems.append("compile=true changes only how speed is timed: give speedup>= or objective=speedup")
        if not 0 <= self.tie < 1:
            problems.append(f"tie={self.tie} must be in [0, 1): the fraction of the best objective that counts as equal")
        if self.objective == "quality" and self.quality is not None:
            problems.append("objective=quality with a quality constraint: drop one (the search maximises quality)")
        if self.objective == "quality" and self.ppl is None and not (self.speedup or self.size):
            problems.append("objective=quality needs a speedup= or size= constraint, else the original is the answer")
        if self.objective != "quality" and self.quality is None and self.ppl is None:
            problems.append(f"objective={self.objective} needs a quality= (or ppl=) floor, else the search may "
                            "return a model that computes nothing useful")
        if problems:
            raise GoalError("; ".join(problems))

    @property
    def needs_latency(self) -> bool:
        return self.speedup is not None or self.objective == "speedup"

    def thread_counts(self) -> tuple[int, ...]:
        return self.threads or (torch.get_num_threads(),)

    def check_model(self, model: Any) -> None:
        """What the goal times must exist on ``model`` before any work: ``generate()`` for ``decode=``."""
        if self.decode and not callable(getattr(model, "generate", None)):
            raise GoalError(f"decode={self.decode} times generate(), which {type(model).__name__} does not have (a "
                            "transformers causal LM does): drop decode= to time one forward of the example")

    def check_runtime(self) -> None:
        """The runtime must be installed before any work: one clear error with the command."""
        if self.runtime == "onnxruntime" and self.needs_latency:
            missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                raise GoalError(f"runtime=onnxruntime needs {', '.join(missing)}: pip install "
                                f"'graphopt[onnx]' (or choose runtime=torch)")

    def __str__(self) -> str:
        """The goal as text that :meth:`parse` reads back (defaults left out)."""
        parts = []
        for name, op in (("quality", ">="), ("ppl", "<="), ("speedup", ">="), ("size", "<=")):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}{op}{value:g}")
        for f in dataclasses.fields(self):
            if f.name in ("quality", "ppl", "speedup", "size"):
                continue
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={format_value(list(value) if isinstance(value, tuple) else value)}")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> Goal:
        """``"quality>=0.99,speedup>=3,runtime=onnxruntime"``: constraints with ``>=`` / ``<=``, settings with ``=``."""
        if not isinstance(text, str) or not text.strip():
            raise GoalError("an empty goal: say what to reach, e.g. 'quality>=0.99,speedup>=2'")
        values: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for term in (t.strip() for t in split_top(text, ",")):
            m = re.fullmatch(r"([A-Za-z_]\w*)\s*(>=|<=|=)\s*(.+)", term)
            if not m:
                raise GoalError(f"goal term {term!r}: write name>=value, name<=value or name=value")
            name, op, raw = m.groups()
            if name not in fields:
                raise GoalError(f"goal term {term!r}: no setting {name!r}{suggest(name, fields)}")
            want = _BOUNDS.get(name, "=")
            if op != want:
                raise GoalError(f"goal term {term!r}: write {name}{want}{raw}"
                                + (" (a floor)" if want == ">=" else " (a ceiling)" if want == "<=" else ""))
            if name in values:
                raise GoalError(f"goal: {name} given twice")
            values[name] = parse_value(raw.strip())
        try:
            return cls(**values)
        except TypeError as e:
            raise GoalError(f"goal {text!r}: {e}") from None


_BOUNDS = {"quality": ">=", "speedup": ">=", "ppl": "<=", "size": "<="}


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def as_goal(goal: Goal | str) -> Goal:
    if isinstance(goal, Goal):
        return goal
    if isinstance(goal, str):
        return Goal.parse(goal)
    raise GoalError(f"goal= takes a go.Goal or its text ('quality>=0.99,speedup>=2'), got {type(goal).__name__}")
