"""Search for a goal: ``optimize(model, inputs, goal=...)`` picks the passes, their options and their order.

- :mod:`.goal`: :class:`Goal`, its text form, and :class:`GoalError` for goals that cannot be searched;
- :mod:`.space`: the slots of choices the passes declare, and the pipeline of a candidate;
- :mod:`.measure`: a candidate's figures (quality, perplexity ratio, size, speed-up on the goal's runtime), cached;
- :mod:`.search`: the algorithm and its :class:`SearchResult` (points, front, best, what binds).

docs/search.md says how it works and what it does not do yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..cache import cache_dir
from ..frontend.inputs import ExampleInputs, as_example_inputs
from ..infra.pipeline import Pipeline
from .goal import Goal, GoalError, as_goal
from .measure import Evaluator, Point, PointCache, fingerprint
from .search import SearchResult, run_search
from .space import declared_space

__all__ = ["Goal", "GoalError", "Point", "SearchResult", "as_goal", "search_goal"]


def search_goal(model: nn.Module, example_inputs: Any, goal: Goal | str, build: Callable[[Pipeline], Any], *,
                calib: Sequence[Any] | None, eval_data: Sequence[Any] | None,
                cache: str | Path | bool = True) -> SearchResult:
    """Search the declared space for ``goal``; ``build(pipeline)`` makes a candidate as ``optimize`` does.

    Every problem with the goal or the data is raised (:class:`GoalError`) before anything is built."""
    goal = as_goal(goal)
    goal.check_runtime()
    inputs = as_example_inputs(example_inputs)
    held_out = [as_example_inputs(b) for b in eval_data] if eval_data is not None else None
    if (goal.quality is not None or goal.ppl is not None or goal.objective == "quality") and not held_out:
        raise GoalError("a quality or ppl goal needs eval_data=: held-out model inputs (disjoint from calib) that "
                        "the quality figure is measured on; the example inputs alone are too few to rank models")
    if goal.ppl is not None and not any("input_ids" in b.kwargs for b in held_out or []):
        raise GoalError("ppl= needs a language model's eval_data with input_ids (the perplexity is of those tokens)")
    slots, left_out = declared_space(goal.passes, calibrated=calib is not None)
    if not slots:
        raise GoalError("nothing to search: " + ("; ".join(left_out) if left_out else
                                                  "no registered pass declares choices"))
    store = PointCache(_cache_path(cache, model, inputs, goal, held_out, calib))
    evaluator = Evaluator(model, inputs, goal, build, store, held_out or [])
    return run_search(evaluator, slots, goal, left_out)


def _cache_path(cache: str | Path | bool, model: nn.Module, inputs: ExampleInputs, goal: Goal,
                eval_data: list[ExampleInputs] | None, calib: Sequence[Any] | None) -> Path | None:
    if cache is False:
        return None
    folder = cache_dir() / "search" if cache is True else Path(cache)
    data = [inputs, *(eval_data or []), *(as_example_inputs(b) for b in (calib or []))]
    return folder / f"{fingerprint(model, goal, data)}.json"
