"""What the search measures of one candidate: quality, perplexity ratio, size and speed-up on the goal's runtime.

A candidate is built by its pipeline text (the same call ``optimize(model, inputs, <text>)`` makes, so the
text reproduces it); its quality figure is the report's, on ``eval_data`` (computed once for the built model,
not after each of its passes as the report's rows are), its size the weight
bytes relative to the original's, and its speed-up the original's time over its own at every batch size x
thread count of the goal, the two timed in turns (:func:`~graphopt.infra.metrics.interleaved_medians`, for
about 2 seconds a setting: at least 10 rounds, at most 200). On
``runtime="onnxruntime"`` both are exported (``export_onnx``, verified in onnxruntime) and the files are timed;
with ``compile=true`` both run under ``torch.compile`` (:mod:`graphopt.compiled`), compiled before the timing.
Every measured point goes to a JSON cache keyed by the model, the inputs and the goal's measuring settings,
so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compiled import compiled_decoder, compiled_forward
from ..frontend.inputs import ExampleInputs
from ..infra.metrics import count_weight_bytes
from ..infra.pipeline import Pipeline
from ..infra.quality import Quality, Summary, summarize, task_quality
from ..timing import interleaved_medians, num_threads
from .costs import LayerCosts, LayerTimes
from .goal import Goal, GoalError

log = logging.getLogger(__name__)

#: builds a candidate from its pipeline, returning optimize()'s OptimizeResult (optimize hands itself in:
#: the search never builds another way, and this layer does not import the one above it)
Build = Callable[[Pipeline], Any]
#: the user's own quality figure of a model (higher is better); a candidate's quality is its value over the original's
Metric = Callable[[nn.Module], float]


@dataclass
class Point:
    """One candidate's figures (``predicted``: estimated from single changes, not measured)."""

    pipeline: str
    quality: float | None = None
    quality_name: str = ""
    ppl: float | None = None
    size: float = 1.0
    speedups: dict[str, float] = field(default_factory=dict)  # "batch 1, 2 threads" -> original / this
    seconds: float = 0.0  # to build and measure it
    error: str = ""
    predicted: bool = False
    unchanged: list[str] = field(default_factory=list)  # its passes that changed nothing on this model
    untimed: str = ""  # why its speed was not timed (a goal that times)
    ms: dict[str, float] = field(default_factory=dict)  # its own median milliseconds, per timed setting
    layers: dict[str, LayerTimes] = field(default_factory=dict)  # per timed setting: its layers' table times

    @property
    def speedup(self) -> float | None:
        """The worst speed-up over the timed settings (None: not timed)."""
        return min(self.speedups.values()) if self.speedups else None

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def meets(self, goal: Goal) -> list[str]:
        """The constraints this point misses, in words (empty: it meets the goal)."""
        if self.failed:
            return [self.error]
        missed = []
        if goal.quality is not None and (self.quality is None or self.quality < goal.quality):
            missed.append(f"quality {_fmt(self.quality)} < {goal.quality:g}")
        if goal.ppl is not None and (self.ppl is None or self.ppl > goal.ppl):
            missed.append(f"ppl ratio {_fmt(self.ppl)} > {goal.ppl:g}")
        if goal.speedup is not None and self.speedup is None and self.untimed:
            missed.append(f"speed-up not timed: {self.untimed}")
        elif goal.speedup is not None and (self.speedup is None or self.speedup < goal.speedup):
            missed.append(f"speed-up {_fmt(self.speedup)} < {goal.speedup:g}")
        if goal.size is not None and self.size > goal.size:
            missed.append(f"size {self.size:.3f} > {goal.size:g}")
        return missed

    def shortfall(self, goal: Goal) -> float:
        """How far it is from the goal: the relative gaps of the constraints it misses, summed (0: it meets it)."""
        if self.failed:
            return float("inf")
        gaps = []
        if goal.quality is not None:
            gaps.append((goal.quality - (self.quality or 0.0)) / goal.quality)
        if goal.ppl is not None:
            gaps.append(((self.ppl or float("inf")) - goal.ppl) / goal.ppl)
        if goal.speedup is not None:
            gaps.append((goal.speedup - (self.speedup or 0.0)) / goal.speedup)
        if goal.size is not None:
            gaps.append((self.size - goal.size) / goal.size)
        return sum(max(g, 0.0) for g in gaps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        return cls(**data)


def meets_floor(p: Point, goal: Goal) -> bool:
    """Quality and perplexity within the goal (the constraints a further change can only make worse)."""
    if p.failed:
        return False
    if goal.quality is not None and (p.quality is None or p.quality < goal.quality):
        return False
    return not (goal.ppl is not None and (p.ppl is None or p.ppl > goal.ppl))


def _changed(result: Any) -> tuple[str, ...]:
    """The passes of a build that changed the model: builds with the same ones made the same model."""
    return tuple(r.text for r in result.report.passes if r.status != "unchanged")


def metric_of_original(metric: Metric, model: nn.Module) -> float:
    """``metric(model)``, checked: a finite positive float (candidates are compared by their ratio to it)."""
    if not callable(metric):
        raise GoalError(f"metric= takes a function model -> float (higher is better), got {type(metric).__name__}")
    with torch.no_grad():
        value = metric(model)  # (an error inside the user's metric is raised as it is)
    try:
        base = _as_figure(value, "the original")
    except (TypeError, ValueError) as e:
        raise GoalError(str(e)) from None
    if not base > 0:
        raise GoalError(f"metric(original) = {base}: the metric must be higher-is-better and positive on the "
                        "original (e.g. accuracy, or exp(-loss)), as candidates are compared by their ratio to it")
    return base


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _as_figure(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric({what}) returned {type(value).__name__}: it must return a float") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"metric({what}) returned {out}: it must return a finite float")
    return out


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


class PointCache:
    """Measured points by pipeline text in one JSON file (written after each point: a search resumes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.points: dict[str, Point] = {}
        if path is not None and path.exists():
            try:
                self.points = {k: Point.from_json(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, TypeError) as e:
                log.warning("search cache %s is unreadable (%s): starting afresh", path, e)

    def get(self, pipeline: str) -> Point | None:
        return self.points.get(pipeline)

    def put(self, point: Point) -> None:
        self.points[point.pipeline] = point
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: v.to_json() for k, v in self.points.items()}, indent=1))
            tmp.replace(self.path)


def fingerprint(model: nn.Module, goal: Goal, data: list[ExampleInputs], metric: str = "") -> str:
    """What decides a measurement: the weights, the inputs and data (example, held-out, calibration), the
    goal's timing settings and the name of the user's metric."""
    h = hashlib.sha256(metric.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    for batch in data:
        h.update(batch.describe().encode())
        for t in [*batch.args, *batch.kwargs.values()]:
            if isinstance(t, torch.Tensor):
                _update(h, t)
    timing = [goal.runtime, list(goal.batches), list(goal.thread_counts())]
    h.update(json.dumps(timing + ([goal.decode] if goal.decode else []) + (["compile"] if goal.compile else [])
                        ).encode())
    return h.hexdigest()[:16]


def _warm(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` after one call (a compiled one compiles there, not in the timing)."""
    run()
    return run


def prompt_ids(x: ExampleInputs) -> torch.Tensor:
    """The example's ``input_ids``, which compiled decoding continues (it takes no attention mask)."""
    ids = x.kwargs.get("input_ids", x.args[0] if x.args else None)
    mask = x.kwargs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or (isinstance(mask, torch.Tensor) and not bool(mask.all())):
        raise GoalError("compile=true with decode= continues the example's input_ids with no padding: give an "
                        "example with input_ids and no padded positions")
    return ids


def _update(h: Any, t: torch.Tensor) -> None:
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


class Evaluator:
    """Builds and measures candidates against ``model`` (never changed), caching every point.

    A candidate that misses the quality floor is timed only when ``repairable(pipeline)`` says so: a repair
    (``heal``) may lift it over the floor, which the search decides by its speed, or per-layer plans read its
    speed (a uniform choice of a per-layer knob); otherwise its speed changes nothing the search does, and
    timing it costs as much as building it (a compiled candidate compiles first).
    """

    def __init__(self, model: nn.Module, inputs: ExampleInputs, goal: Goal, build: Build, cache: PointCache,
                 eval_data: list[ExampleInputs], repeat: int = 10, seconds: float = 2.0,
                 metric: Metric | None = None, base_metric: float | None = None,
                 repairable: Callable[[Pipeline], bool] = lambda _: True, calib: Sequence[Any] = ()) -> None:
        self.model, self.inputs, self.goal, self.build, self.cache = model, inputs, goal, build, cache
        self.calib = list(calib)  # what per-layer plans estimate each layer's loss on (never the held-out data)
        self.repairable = repairable
        self.repeat, self.seconds = repeat, seconds  # timing rounds per setting: at least, and seconds to aim for
        self.metric, self._base_metric = metric, base_metric  # the user's figure, and its value on the original
        self.eval_data = eval_data or ([] if metric is not None else [inputs])
        self._reference: list[Summary | None] = []  # the original's, per held-out batch
        self.base_bytes = count_weight_bytes(model)
        self.settings = [(b, t) for b in goal.batches for t in goal.thread_counts()]
        self._dir = tempfile.TemporaryDirectory(prefix="graphopt-search-") if goal.runtime == "onnxruntime" else None
        self._base_runs: dict[tuple[int, int], Callable[[], None]] = {}
        self._built: dict[tuple[str, ...], Point] = {}  # the passes that changed a build -> its point
        self.costs = LayerCosts(goal.runtime, goal.decode, export_dir=Path(self._dir.name) if self._dir else None)

    def close(self) -> None:
        self.costs.save()
        if self._dir is not None:
            self._dir.cleanup()

    def measure(self, pipeline: Pipeline, layers: bool = True) -> Point:
        """The point of ``pipeline`` from the cache, else built and measured now (a failure is a point too);
        ``layers``: cost its layers from the latency table too, when it is timed."""
        text = str(pipeline)
        cached = self.cache.get(text)
        if cached is not None and (cached.failed or cached.speedups or not self._times(cached, pipeline)):
            return cached  # (a point cached untimed is measured again when this goal times it)
        start = time.perf_counter()
        point = Point(text)
        try:
            result = self.build(pipeline)
            if not result.ok:
                failed = result.report.failed[0]
                point.error = f"{failed.text} was rolled back: {failed.reason}"
            else:
                self._figures(point, result, pipeline, layers)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be built or timed is a failed point, said
            point.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.info("search: %s failed: %s", text, point.error)
        point.seconds = time.perf_counter() - start
        self.cache.put(point)
        return point

    def _figures(self, point: Point, result: Any, pipeline: Pipeline, layers: bool) -> None:
        point.unchanged = [r.text for r in result.report.passes if r.status == "unchanged"]
        changed = _changed(result)
        same = self._built.get(changed)
        if same is not None:  # its other passes changed nothing: the model is one measured before
            point.quality, point.quality_name, point.ppl = same.quality, same.quality_name, same.ppl
            point.size, point.speedups, point.untimed = same.size, dict(same.speedups), same.untimed
            point.ms, point.layers = dict(same.ms), dict(same.layers)
            return
        wanted = self.metric is None or self.goal.ppl is not None  # (with a metric, only ppl is read from it)
        figure = self._quality(result.model) if self.eval_data and wanted else None
        if figure is not None:
            point.quality, point.quality_name, point.ppl = figure.value, figure.name, figure.extra.get("ppl ratio")
        if self.metric is not None:
            point.quality, point.quality_name = self._metric(result.model), f"{_name(self.metric)} / original"
        point.size = count_weight_bytes(result.model) / self.base_bytes
        if self._times(point, pipeline):
            point.speedups, point.ms = self._timed(result.model)
            point.layers = self._layer_times(result.model) if layers else {}
        elif self.goal.needs_latency:
            point.untimed = "it misses the quality floor, and no repair is tried on it"
        self._built[changed] = point

    def _times(self, point: Point, pipeline: Pipeline) -> bool:
        """Whether this goal times ``point``: it times at all, and the point meets the quality floor or may be
        repaired."""
        return self.goal.needs_latency and (meets_floor(point, self.goal) or self.repairable(pipeline))

    def _quality(self, candidate: nn.Module) -> Quality | None:
        """The report's figure (:mod:`graphopt.infra.quality`) on the held-out batches: measured here once per
        candidate, not after each of its passes as a report does."""
        with torch.no_grad():
            if not self._reference:
                self._reference = [summarize(b.call(self.model), b) for b in self.eval_data]
            now = [summarize(b.call(candidate), b) for b in self.eval_data]
        return task_quality(list(zip(now, self._reference)))

    def _metric(self, candidate: nn.Module) -> float:
        """The user's figure of ``candidate`` over the original's."""
        assert self.metric is not None and self._base_metric is not None
        with torch.no_grad():
            return _as_figure(self.metric(candidate), "a candidate") / self._base_metric

    def _timed(self, candidate: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """The candidate's speed-ups and own milliseconds at every setting."""
        return self._timed_together([self._runners(candidate)])[0]

    def _layer_times(self, candidate: nn.Module) -> dict[str, LayerTimes]:
        """The candidate's layers costed from the latency table at every setting (:mod:`.costs`)."""
        return {self.key(b, t): self.costs.profile(candidate, self.inputs.with_batch(b), t) for b, t in self.settings}

    def key(self, batch: int, threads: int) -> str:
        """A timed setting's name in the points' figures."""
        decode = ("compiled, " if self.goal.compile else "") + (f"decode {self.goal.decode}, " if self.goal.decode
                                                                else "")
        return f"{decode}batch {batch}, {threads} thread{'s' if threads > 1 else ''}"

    def _timed_together(self, runs: list[dict[tuple[int, int], Callable[[], None]]]
                        ) -> list[tuple[dict[str, float], dict[str, float]]]:
        """Each candidate's speed-ups and own milliseconds: at each setting the original and every candidate in
        turns."""
        out: list[tuple[dict[str, float], dict[str, float]]] = [({}, {}) for _ in runs]
        for batch, threads in self.settings:
            group = [self._base_runs[(batch, threads)], *(r[(batch, threads)] for r in runs)]
            with num_threads(threads), torch.no_grad():
                base, *times = interleaved_medians(group, self._rounds(group), warmup=2)
            for (speedups, ms), new in zip(out, times):
                speedups[self.key(batch, threads)] = base / new
                ms[self.key(batch, threads)] = 1e3 * new
        return out

    def retime(self, points: list[tuple[Point, Pipeline]]) -> list[Point]:
        """``points`` rebuilt from their pipelines and timed again, together: the original and every one of them
        in turns at each setting, so that their ranking is one measurement's (on 2 cores a call of a few
        milliseconds moves by 10-30% from one run to the next). Returns the points with the new speed-ups,
        cached; a point that no longer builds is left out."""
        built: list[tuple[Point, tuple[str, ...]]] = []
        runs: dict[tuple[str, ...], dict[tuple[int, int], Callable[[], None]]] = {}
        for i, (point, pipeline) in enumerate(points):
            try:
                result = self.build(pipeline)
            except Exception as e:  # noqa: BLE001 - said, and the point keeps its first timing
                log.warning("search: %s did not build again to be re-timed: %s", point.pipeline, e)
                continue
            if not result.ok:
                continue
            changed = _changed(result)
            built.append((point, changed))
            if changed not in runs:  # (a point whose own passes changed nothing is a model timed here already)
                runs[changed] = self._runners(result.model, f"confirm{i}")
        figures = dict(zip(runs, self._timed_together(list(runs.values())))) if runs else {}
        out = [dataclasses.replace(p, speedups=dict(figures[changed][0]), ms=dict(figures[changed][1]))
               for p, changed in built]
        for point in out:
            self.cache.put(point)
        return out

    def _rounds(self, pair: list[Callable[[], None]]) -> int:
        """Rounds for about ``seconds`` of timing (at least ``repeat``, at most 200): a millisecond call needs
        hundreds of rounds for a median that holds still, a slow one ten."""
        start = time.perf_counter()
        for run in pair:
            run()
        once = max(time.perf_counter() - start, 1e-6)
        return int(min(200, max(self.repeat, self.seconds / once)))

    def _runners(self, candidate: nn.Module, name: str = "candidate") -> dict[tuple[int, int], Callable[[], None]]:
        if self.goal.runtime == "torch":
            if not self._base_runs:
                self._base_runs = self._torch_runs(self.model)
            return self._torch_runs(candidate)
        if not self._base_runs:
            self._base_runs = self._ort_runs(self.model, "original")
        return self._ort_runs(candidate, name)

    def _torch_runs(self, module: nn.Module) -> dict[tuple[int, int], Callable[[], None]]:
        n, compiled = self.goal.decode, self.goal.compile

        def runner(x: ExampleInputs) -> Callable[[], None]:
            if n and compiled:  # the prompt eagerly, then n - 1 compiled steps over a static KV cache
                return _warm(compiled_decoder(module, prompt_ids(x), n))
            if n:  # greedy decoding of n tokens after the example's prompt (its prefill included)
                return lambda: module.generate(*x.args, **x.kwargs, max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False)
            if compiled:
                forward = compiled_forward(module)
                return _warm(lambda: x.call(module, via=forward))
            return lambda: x.call(module)

        runs = {}
        for b, t in self.settings:
            with num_threads(t), torch.no_grad():  # inductor writes its kernels for the thread count
                runs[(b, t)] = runner(self.inputs.with_batch(b))
        return runs

    def _ort_runs(self, module: nn.Module, name: str) -> dict[tuple[int, int], Callable[[], None]]:
        from ..emit.onnx_export import export_onnx
        from ..emit.onnx_verify import ort_runner

        assert self._dir is not None
        path = Path(self._dir.name) / f"{name}.onnx"
        export_onnx(module, self.inputs.with_batch(2), path, dynamic_axes="auto")  # at batch 2: a dynamic batch axis
        return {(b, t): ort_runner(path, module, self.inputs.with_batch(b), t) for b, t in self.settings}
