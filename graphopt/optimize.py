"""``optimize()``: the one call users make, and its result."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .emit.hf import check_save_pretrained, refusal
from .frontend.calib import check_calibration
from .frontend.inputs import InputError, as_example_inputs
from .infra.contract import Pass
from .infra.instruments import Instrument
from .infra.manager import Measure, PassManager
from .infra.pipeline import Pipeline, as_pipeline
from .infra.program import Program
from .infra.report import Report
from .search import Goal, GoalError, Metric, SearchResult, search_goal

if TYPE_CHECKING:
    from .emit.onnx_export import ExportReport

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "default"


@dataclass
class OptimizeResult:
    """The optimised model, the Program it came from, the pipeline that ran and the report."""

    model: nn.Module
    program: Program
    pipeline: Pipeline
    report: Report
    #: with ``optimize(goal=...)``: every point measured, the front, and why this pipeline was chosen
    search: SearchResult | None = None

    @property
    def ok(self) -> bool:
        """True when every pass ran (none was rolled back); see ``report.failed`` for the others."""
        return self.report.ok

    def export_onnx(self, path: str | Path, **kwargs: Any) -> ExportReport:
        """Export the optimised model to ONNX, checked in onnxruntime (see :func:`graphopt.export_onnx`)."""
        from .emit.onnx_export import export_onnx

        return export_onnx(self.model, self.program.example_inputs, path, **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write weights (safetensors) and the edit log (JSON); see :func:`graphopt.save`."""
        from .emit.save import save

        return save(self, directory)


def _check_flags(**flags: Any) -> None:
    """optimize()'s keyword options: one clear error each, before anything runs."""
    for name in ("inplace", "verify"):
        if not isinstance(flags[name], bool):
            raise TypeError(f"optimize({name}=...) takes true or false, got {type(flags[name]).__name__}")
    if not isinstance(flags["measure"], (bool, Measure)):
        raise TypeError(f"optimize(measure=...) takes a bool or a go.Measure, got {type(flags['measure']).__name__}")
    if not isinstance(flags["on_error"], str) or flags["on_error"] not in ("rollback", "raise"):
        raise ValueError(f"optimize(on_error={flags['on_error']!r}): choose 'rollback' or 'raise'")
    if flags["progress"] is not None and not isinstance(flags["progress"], bool):
        raise TypeError(f"optimize(progress=...) takes true, false or None, got {type(flags['progress']).__name__}")
    if not isinstance(flags["model_spec"], str):
        raise TypeError(f"optimize(model_spec=...) takes a str, got {type(flags['model_spec']).__name__}")


_EMPTY = object()


def _materialise(calib: Iterable[Any] | None) -> Iterable[Any] | None:
    if calib is None:
        return None
    try:
        if iter(calib) is calib:  # a one-shot iterator: passes may need several epochs
            return list(calib)
    except TypeError:
        raise TypeError(f"calib must be an iterable of model inputs, got {type(calib).__name__}") from None
    return calib


@contextlib.contextmanager
def _buffers_kept(model: nn.Module | None) -> Iterator[None]:
    """Inside, ``model`` may run (as a distillation teacher); afterwards its buffers hold what they held before,
    also for a forward that updates them (counters, running averages). The caller's model stays untouched."""
    saved = {} if model is None else {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        if model is not None:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in saved and b.shape == saved[name].shape:
                        b.copy_(saved[name])


def optimize(model: nn.Module, example_inputs: Any, pipeline: str | Pipeline | Iterable[Pass | str] = DEFAULT_PIPELINE,
             *, calib: Iterable[Any] | None = None, inplace: bool = False, verify: bool = True,
             measure: Measure | bool = True, on_error: Literal["rollback", "raise"] = "rollback",
             progress: bool | None = None, model_spec: str = "MODEL",
             eval_data: Iterable[Any] | None = None, instruments: Sequence[Instrument] = (),
             goal: Goal | str | None = None, metric: Metric | None = None) -> OptimizeResult:
    """Run ``pipeline`` on a copy of ``model`` (or on ``model`` itself with ``inplace=True``), or, with
    ``goal=``, search for the pipeline that best meets the goal (:func:`optimize_for`).

    Args:
        model: the model to optimise; put in eval mode (on the copy unless ``inplace``).
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args.
        pipeline: pipeline text (``"fold_bn,remove_dropout"``), a preset name, or a list of passes.
        calib: calibration data for passes that need it: an iterable of model inputs.
        verify: run the model after each pass and check its outputs against the pass's tolerance.
        measure: record params/FLOPs/latency per pass (a :class:`Measure` picks which).
        on_error: ``"rollback"`` a failing pass and go on, or roll back and ``"raise"`` PassFailedError.
        eval_data: held-out model inputs (like ``calib``, disjoint from it) for the report's quality figure;
            without them the figure is computed on the example inputs.
        instruments: more measurements around each pass (:class:`~graphopt.infra.instruments.Instrument`,
            e.g. ``go.PassMemory()`` for each pass's peak memory); each adds a column to the report.
        goal: a :class:`~graphopt.Goal` or its text (``"quality>=0.99,speedup>=2"``): search instead of
            running ``pipeline`` (which must then be left out).
        metric: with ``goal=``, your own quality figure ``metric(model) -> float`` (higher is better, e.g.
            accuracy on your data): a candidate's quality is its metric over the original's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() needs an nn.Module, got {type(model).__name__}")
    if goal is not None:
        if not (isinstance(pipeline, str) and pipeline == DEFAULT_PIPELINE):
            raise GoalError("optimize(): give pipeline= or goal=, not both (the search picks the pipeline)")
        return optimize_for(model, example_inputs, goal, calib=calib, inplace=inplace, eval_data=eval_data,
                            model_spec=model_spec, instruments=instruments, metric=metric)
    if metric is not None:
        raise GoalError("optimize(): metric= ranks the candidates of a goal search: give goal= too (a pipeline's "
                        "report measures the model against the original on eval_data=)")
    passes = as_pipeline(pipeline)  # parse first: a typo costs nothing
    _check_flags(inplace=inplace, verify=verify, measure=measure, on_error=on_error, progress=progress,
                 model_spec=model_spec)
    inputs = as_example_inputs(example_inputs)
    batches = _materialise(calib)
    needing = [p.name for p in passes if p.needs_calibration]
    if batches is not None and needing and next(iter(batches), _EMPTY) is _EMPTY:  # (a DataLoader is not run)
        raise InputError(f"calib is empty, and {', '.join(dict.fromkeys(needing))} read calibration data: give "
                         "at least one batch of model inputs")
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    if batches is not None:  # before any pass runs; a wrong width is found by running one batch
        check_calibration(batches, inputs, work, run=any(p.needs_calibration for p in passes))
    held_out = _materialise(eval_data)
    if held_out is not None:
        check_calibration(held_out, inputs, work, run=True, what="eval_data")
        held_out = list(held_out)
    original = model
    if inplace and any(p.needs_original for p in passes):
        original = copy.deepcopy(model)  # the teacher must not change under the passes
    program = Program(work, inputs, calib=batches, original=original)
    manager = PassManager(passes, verify=verify, measure=measure, on_error=on_error, progress=progress,
                          model_spec=model_spec, eval_batches=held_out, instruments=instruments)
    teacher_is_callers = original is model and any(p.needs_original for p in passes)
    with _buffers_kept(original if teacher_is_callers else None):  # the caller's model runs as the teacher
        report = manager.run(program)
    problems = check_save_pretrained(program.module)
    if problems:
        report.notes.append(refusal(program.module, problems))
    return OptimizeResult(program.module, program, passes, report)


def optimize_for(model: nn.Module, example_inputs: Any, goal: Goal | str, *, calib: Iterable[Any] | None = None,
                 eval_data: Iterable[Any] | None = None, inplace: bool = False, model_spec: str = "MODEL",
                 instruments: Sequence[Instrument] = (), cache: str | Path | bool = True,
                 metric: Metric | None = None) -> OptimizeResult:
    """Search the passes' declared choices for ``goal`` (docs/search.md) and return the best model found.

    Every candidate is built by :func:`optimize` with its pipeline text, so ``result.pipeline`` rebuilds the
    model; ``result.search`` holds every measured point, the Pareto front and its table and plot. When no
    point meets the goal the original (with the exact clean-ups) is returned and ``result.search.binding``
    says which constraint stops it. ``cache``: where measured points are kept (True: graphopt's cache
    directory; False: nowhere), so an interrupted search resumes. ``metric(model) -> float``: the quality
    figure instead of the report's (a candidate's quality is its metric over the original's).
    """
    batches, held_out = _materialise(calib), _materialise(eval_data)
    batches = list(batches) if batches is not None else None
    held_out = list(held_out) if held_out is not None else None

    def build(pipeline: Pipeline, **kw: Any) -> OptimizeResult:
        """A candidate as optimize() makes it (the search measures its quality itself: no held-out data here)."""
        options: dict[str, Any] = {"measure": False, "progress": False, "eval_data": None, **kw}
        return optimize(model, example_inputs, pipeline, calib=batches, model_spec=model_spec, **options)

    found = search_goal(model, example_inputs, goal, build, calib=batches, eval_data=held_out, cache=cache,
                        metric=metric)
    chosen = found.best.pipeline if found.best is not None else "default"
    result = build(as_pipeline(chosen), inplace=inplace, instruments=instruments, measure=True, progress=None,
                   eval_data=held_out)
    result.search = found
    if found.best is None:
        result.report.notes.append(f"optimize(goal=...): {found.binding}; the model is the original with the "
                                   "exact clean-ups")
    return result
