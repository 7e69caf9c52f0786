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
from ..frontend.preserve import preserved
from ..infra.pipeline import Pipeline
from .goal import Goal, GoalError, as_goal
from .layerwise import plan_value
from .measure import Evaluator, Metric, Point, PointCache, fingerprint, metric_of_original, prompt_ids
from .search import SearchResult, run_search
from .space import declared_space

__all__ = ["Goal", "GoalError", "Metric", "Point", "SearchResult", "as_goal", "search_goal"]


def search_goal(model: nn.Module, example_inputs: Any, goal: Goal | str, build: Callable[[Pipeline], Any], *,
                calib: Sequence[Any] | None, eval_data: Sequence[Any] | None,
                cache: str | Path | bool = True, metric: Metric | None = None) -> SearchResult:
    """Search the declared space for ``goal``; ``build(pipeline)`` makes a candidate as ``optimize`` does.

    ``metric(model) -> float`` (higher is better) replaces the report's quality figure: a candidate's quality
    is then its metric over the original's. Every problem with the goal or the data is raised
    (:class:`GoalError`) before anything is built."""
    goal = as_goal(goal)
    goal.check_runtime()
    goal.check_model(model)
    inputs = as_example_inputs(example_inputs)
    if goal.compile and goal.decode:
        prompt_ids(inputs.with_batch(1))  # what compiled decoding continues (the timed batches repeat the
        # example's first sample): said now, not by every candidate
    held_out = [as_example_inputs(b) for b in eval_data] if eval_data is not None else None
    if (goal.quality is not None or goal.objective == "quality") and not held_out and metric is None:
        raise GoalError("a quality goal needs eval_data=: held-out model inputs (disjoint from calib) that "
                        "the quality figure is measured on (or metric=: your own figure of a model); the "
                        "example inputs alone are too few to rank models")
    if goal.ppl is not None and not any("input_ids" in b.kwargs for b in held_out or []):
        raise GoalError("ppl= needs a language model's eval_data with input_ids (the perplexity is of those tokens)")
    space = declared_space(goal.passes, calibrated=calib is not None)
    if not space.slots:
        raise GoalError("nothing to search: " + ("; ".join(space.left_out) if space.left_out else
                                                  "no registered pass declares choices"))
    with preserved(model):  # the reference, the metric and the timings run the caller's model in eval mode
        base_metric = metric_of_original(metric, model) if metric is not None else None
        store = PointCache(_cache_path(cache, model, inputs, goal, held_out, calib, metric, base_metric))
        evaluator = Evaluator(model, inputs, goal, build, store, held_out or [], metric=metric,
                              base_metric=base_metric,
                              repairable=_timed_under_floor(space.repairs if goal.heal else [], goal.plans),
                              calib=calib or ())
        return run_search(evaluator, space, goal)


def _timed_under_floor(repairs: Sequence[Any], plans: int) -> Callable[[Pipeline], bool]:
    """Whether a candidate under the quality floor is timed all the same: a repairing pass may run on it (one of
    its passes is lossy, declares a ``change``, and comes before the repair's stage: the search's rule for what
    it repairs, :meth:`Search.repairable`), or it is a uniform choice that per-layer plans read (their speed is
    spread over the layers from its measured time: :mod:`.layerwise`)."""
    def check(pipeline: Pipeline) -> bool:
        return any(type(p).change and type(p).stage < type(r).stage for r in repairs for p in pipeline) or \
            (plans > 0 and any(plan_value(p) is not None for p in pipeline))

    return check


def _cache_path(cache: str | Path | bool, model: nn.Module, inputs: ExampleInputs, goal: Goal,
                eval_data: list[ExampleInputs] | None, calib: Sequence[Any] | None,
                metric: Metric | None, base_metric: float | None) -> Path | None:
    """The cache file of a search: a user's metric is known by its name and its value on the original."""
    if cache is False:
        return None
    folder = cache_dir() / "search" if cache is True else Path(cache)
    data = [inputs, *(eval_data or []), *(as_example_inputs(b) for b in (calib or []))]
    name = "" if metric is None else \
        f"{getattr(metric, '__module__', '')}.{getattr(metric, '__qualname__', metric)}={base_metric!r}"
    return folder / f"{fingerprint(model, goal, data, name)}.json"
