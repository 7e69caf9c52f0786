"""Instruments: what the pass manager measures around each pass, one object per measurement.

As MLIR's pass instrumentation and TVM's ``PassContext(instruments=...)``: the manager calls every
instrument at fixed points and knows nothing of what they measure. An instrument sees

- ``run_begins(program)`` once, before the original model's row;
- ``before_pass(program, p)`` / ``after_pass(record, program)`` right around a pass's own run (what the
  pass costs: memory, time), also when it fails;
- ``measure(record, seen)`` for every row, the original's first: the model as it is now, with its
  outputs and the reference they are compared with (:class:`Seen`);
- ``run_ends(report, program)`` once at the end (notes, figures that need every row).

The built-in ones fill the report's columns (:class:`Size`, :class:`Flops`, :class:`Latency`,
:class:`OutputError`, :class:`Quality`); :class:`PassMemory` fills an extra column. A user's own
instrument writes ``record.measures[name] = value`` and the report shows it as a column. An
instrument that raises is noted in the report and never fails a pass.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..frontend.inputs import OutputMismatch, compare_outputs
from ..nn.quant import PackedLayer
from ..units import MIB
from .contract import Pass
from .metrics import PeakMemory, count_flops, count_params, count_weight_bytes, measure_latencies
from .program import Program
from .quality import summarize, task_quality
from .report import PassRecord, Report

log = logging.getLogger(__name__)


@dataclass
class Seen:
    """The model after a pass, as ``Instrument.measure`` sees it."""

    program: Program
    outputs: Any  # the model's outputs on the example inputs now
    reference: Any  # what they are compared with: the original's, or those of the last pass that changed them
    rebased: bool = False  # this pass changed the outputs on purpose: they are the new reference, no error figure
    compared: bool = True  # outputs are compared (verify=True, or the original's row)


class Instrument:
    """Base class: every hook does nothing; override the ones you need."""

    name = "instrument"

    def run_begins(self, program: Program) -> None:
        """Before the original model's row."""

    def before_pass(self, program: Program, p: Pass) -> None:
        """Right before ``p.run``."""

    def after_pass(self, record: PassRecord, program: Program) -> None:
        """Right after ``p.run`` returned or raised (before verification; ``record.status`` may change later)."""

    def measure(self, record: PassRecord, seen: Seen) -> None:
        """Measure the model as it is after the row's pass (the original's row first)."""

    def run_ends(self, report: Report, program: Program) -> None:
        """After the last pass."""


class Size(Instrument):
    """Parameter count and bytes of every tensor held (``params``, ``weights`` columns)."""

    name = "size"

    def measure(self, record: PassRecord, seen: Seen) -> None:
        record.params = count_params(seen.program.module)
        record.weight_bytes = count_weight_bytes(seen.program.module)


class Flops(Instrument):
    """FLOPs of one forward on the example inputs (``FLOPs`` column)."""

    name = "flops"

    def measure(self, record: PassRecord, seen: Seen) -> None:
        record.flops = count_flops(seen.program.module, seen.program.example_inputs)


class Latency(Instrument):
    """Median eager latency, timed in turn with a copy of the original (``latency ms``, ``vs original``)."""

    name = "latency"

    def __init__(self, repeat: int = 10) -> None:
        self.repeat = repeat
        self._original: torch.nn.Module | None = None  # a copy, timed next to every later model
        self._original_ms: list[float] = []

    def measure(self, record: PassRecord, seen: Seen) -> None:
        program = seen.program
        if not self.repeat or program.device.type == "meta":
            return
        if record.status == "baseline":
            self._original, self._original_ms = copy.deepcopy(program.module), []
        reference = None if record.status == "baseline" else self._original
        lat = measure_latencies(program.module, program.example_inputs, reference, repeat=self.repeat)
        if lat is None:
            return
        record.latency_ms, record.latency_spread, record.threads = lat.ms, lat.spread, lat.threads
        record.latency_runs = lat.runs
        record.latency_ratio, record.latency_ratio_spread = lat.ratio, lat.ratio_spread
        if lat.reference_ms is not None:
            self._original_ms.append(lat.reference_ms)

    def run_ends(self, report: Report, program: Program) -> None:
        self._original = None  # the copy is only for timing
        if self._original_ms and report.records:  # the original's time in the same conditions as the others
            report.records[0].latency_ms = statistics.median(self._original_ms)
        if any(isinstance(m, PackedLayer) for m in program.module.modules()):
            report.notes.append(
                "latency is PyTorch eager on this machine, where quantized layers run graphopt's reference "
                "(dequantize, then a float matmul or convolution): slower than float; their fast paths are the ONNX export "
                "(result.export_onnx, onnxruntime's integer kernels) and the Triton kernels on CUDA")


class OutputError(Instrument):
    """Max abs / rel error and cosine of the outputs against the reference (no figure for a rebased row)."""

    name = "output error"

    def measure(self, record: PassRecord, seen: Seen) -> None:
        if not seen.compared or seen.rebased or seen.program.device.type == "meta":
            return
        try:
            err = compare_outputs(seen.outputs, seen.reference)
        except OutputMismatch:
            return
        record.max_abs_err, record.max_rel_err, record.cosine = err.max_abs, err.max_rel, err.cosine


class Quality(Instrument):
    """The task-aware figure against the reference, on held-out batches when given (``quality`` column).

    A rebased row's summaries become the reference for later rows and it gets no figure.
    """

    name = "quality"

    def __init__(self, eval_batches: Sequence[Any] = ()) -> None:
        self.eval_batches = list(eval_batches)
        self._reference: list[Any] = []  # the reference model's summary per held-out batch

    def measure(self, record: PassRecord, seen: Seen) -> None:
        program = seen.program
        if not seen.compared or program.device.type == "meta":
            return
        if self.eval_batches:
            with torch.no_grad():  # the reference's summaries are kept (small: pooled vectors, ids)
                now = [summarize(b.call(program.module), b) for b in self.eval_batches]
            if record.status == "baseline" or seen.rebased:
                self._reference = now
            if seen.rebased:
                return
            pairs = list(zip(now, self._reference))
            data = f"{sum(b.batch_size for b in self.eval_batches)} held-out samples"
        elif seen.rebased:
            return
        else:
            x = program.example_inputs
            pairs, data = [(summarize(seen.outputs, x), summarize(seen.reference, x))], "the example inputs"
        figure = task_quality(pairs)
        if figure is not None:
            record.quality, record.quality_name, record.quality_data = figure.value, figure.name, data
            record.measures.update(figure.extra)


class PassMemory(Instrument):
    """Peak memory while each pass ran, above its level when the pass began (``peak MiB`` column).

    On CUDA the allocator's peak of the model's device; elsewhere this process's resident memory,
    sampled by a thread (memory the allocator kept from earlier passes counts as already there).
    """

    name = "peak MiB"

    def __init__(self) -> None:
        self._sampler: PeakMemory | None = None
        self._cuda: torch.device | None = None
        self._cuda_start = 0

    def before_pass(self, program: Program, p: Pass) -> None:
        if program.device.type == "cuda":
            self._cuda = program.device
            torch.cuda.reset_peak_memory_stats(self._cuda)
            self._cuda_start = torch.cuda.memory_allocated(self._cuda)
        else:
            self._cuda, self._sampler = None, PeakMemory().__enter__()

    def after_pass(self, record: PassRecord, program: Program) -> None:
        if self._cuda is not None:
            peak = torch.cuda.max_memory_allocated(self._cuda) - self._cuda_start
        elif self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            peak, self._sampler = self._sampler.bytes, None
        else:
            return
        record.measures[self.name] = peak / MIB


def default_instruments(*, params: bool, flops: bool, latency_repeat: int,
                        eval_batches: Sequence[Any] = ()) -> list[Instrument]:
    """The instruments behind the report's standard columns, as :class:`~graphopt.Measure` selects them
    (output error and quality always: they measure only rows whose outputs are compared)."""
    chosen: list[Instrument] = [Size()] if params else []
    chosen += [Flops()] if flops else []
    chosen += [Latency(latency_repeat)] if latency_repeat else []
    return [*chosen, OutputError(), Quality(eval_batches)]
