"""The pass manager: run passes, verify after each, roll back failures, record measurements."""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..analysis.diagnostics import Diagnostic
from ..frontend.inputs import (
    OutputMismatch,
    as_example_inputs,
    compare_outputs,
    flatten_outputs,
    missing_inputs,
)
from ..progress import Progress
from ..progress import log as progress_log
from .contract import Pass, PassResult
from .instruments import Instrument, Seen, default_instruments
from .pipeline import Pipeline
from .program import Program
from .report import PassRecord, Report

log = logging.getLogger(__name__)


class PassFailedError(RuntimeError):
    """A pass raised or failed verification (raised only with ``on_error="raise"``; the model is rolled back)."""

    def __init__(self, record: PassRecord, report: Report) -> None:
        super().__init__(f"pass {record.text} failed: {record.reason}\n  reproduce: {record.reproduce}")
        self.record = record
        self.report = report


class PassRolledBackWarning(UserWarning):
    """A pass failed and was rolled back; ``optimize`` went on (``on_error="rollback"``)."""


class VerificationError(RuntimeError):
    """The model no longer runs, or its outputs moved beyond the pass's tolerance."""


@dataclass
class Measure:
    """Which instruments run after each pass."""

    params: bool = True
    flops: bool = True
    latency: bool = True
    latency_repeat: int = 10


#: a pass's tolerance is at least this many ulps of 1 in the model's lowest floating precision
ULPS = 8


def tolerance_for(tolerance: float, module: torch.nn.Module, outputs: Any) -> float:
    """The pass's tolerance, raised to what the model's lowest floating precision can show (fp16, bf16)."""
    dtypes = {t.dtype for t in flatten_outputs(outputs).values() if t.is_floating_point()}
    dtypes |= {p.dtype for p in module.parameters() if p.is_floating_point()}
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    return max(tolerance, ULPS * eps) if eps > torch.finfo(torch.float32).eps else tolerance


def non_finite(outputs: Any) -> str:
    """Names of outputs holding NaN or inf ('' if none)."""
    bad = [name for name, t in flatten_outputs(outputs).items()
           if t.is_floating_point() and t.device.type != "meta" and not bool(t.isfinite().all())]
    return ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")


def compared_outputs(output: Any, model_name: str = "the model") -> tuple[list[str], list[str]]:
    """``(compared, not compared)``: the tensor outputs verification compares as ``name[shape]``, and the rest.

    Raises :class:`VerificationError` when the output holds no tensor at all (nothing could be verified).
    """
    skipped: list[str] = []
    flat = flatten_outputs(output, skipped=skipped)
    if not flat:
        raise VerificationError(
            f"{model_name} returns {type(output).__name__} with no tensors in it; graphopt verifies a rewrite by "
            "comparing the tensors a user reads (logits, hidden states): return a tensor, a tuple/dict of "
            "tensors, a dataclass or a HF ModelOutput")

    def label(path: str) -> str:
        return path.removeprefix("output.").removeprefix("output") or "output"

    compared = [f"{label(k)}{list(t.shape)}" for k, t in flat.items()]
    return compared, [label(s) for s in skipped]


class PassManager:
    """Runs a pipeline over a Program with verification, rollback and instrumentation."""

    def __init__(self, pipeline: Pipeline, *, verify: bool = True, measure: Measure | bool = True,
                 on_error: Literal["rollback", "raise"] = "rollback", progress: bool | None = None,
                 model_spec: str = "MODEL", eval_batches: list[Any] | None = None,
                 instruments: Sequence[Instrument] = ()) -> None:
        if on_error not in ("rollback", "raise"):
            raise ValueError(f"on_error must be 'rollback' or 'raise', got {on_error!r}")
        bad = [type(i).__name__ for i in instruments if not isinstance(i, Instrument)]
        if bad:
            raise TypeError(f"instruments must be go.Instrument objects (subclass it), got {', '.join(bad)}")
        self.pipeline = pipeline
        self.verify = verify
        on = bool(measure)
        self.measure = measure if isinstance(measure, Measure) else Measure(params=on, flops=on, latency=on)
        if not self.measure.latency:
            self.measure.latency_repeat = 0
        self.on_error = on_error
        self.progress = progress
        m = self.measure
        self.instruments: list[Instrument] = [
            *default_instruments(params=m.params, flops=m.flops, latency_repeat=m.latency_repeat,
                                 eval_batches=[as_example_inputs(b) for b in eval_batches or []]),
            *instruments]
        self._reference_out: Any = None  # outputs later rows are compared with (see _run_one)
        self._report: Report | None = None
        self.model_spec = model_spec

    def _each(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every instrument; one that raises is noted in the report, never fails the run."""
        for instrument in self.instruments:
            try:
                getattr(instrument, hook)(*args)
            except Exception as e:
                log.warning("instrument %s failed in %s: %s", instrument.name, hook, e)
                if self._report is not None:
                    self._report.notes.append(f"instrument {instrument.name!r} failed in {hook}: "
                                              f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------
    def run(self, program: Program) -> Report:
        report = self._report = Report(pipeline=str(self.pipeline))
        self._each("run_begins", program)
        original_out = self._outputs(program)
        report.outputs, report.not_compared = compared_outputs(original_out, type(program.module).__name__)
        bad = non_finite(original_out)
        if bad:
            report.notes.append(f"the model's own outputs are not finite before any pass ({bad}): passes that "
                                f"must keep outputs cannot be verified; check the model and its example inputs")
        report.records.append(self._measured(PassRecord("original", "original", "baseline"), program,
                                             original_out, original_out))
        previous_out = self._reference_out = original_out
        n = len(self.pipeline)
        single = self.progress is None and n < 2  # one pass: its own progress is the bar
        with Progress("graphopt", total=n, unit="pass", bar=False if single else self.progress,
                      every=math.inf) as bar:  # (closed on an interrupt or a raised failure too)
            for index, p in enumerate(self.pipeline):
                progress_log.info("pass %d/%d: %s ...", index + 1, n, p.label())
                record, previous_out = self._run_one(program, p, index, previous_out)
                report.records.append(record)
                bar.update(last=p.name)
                progress_log.info("pass %d/%d: %s %s in %.1f s", index + 1, n, record.text, record.status,
                                  record.seconds or 0.0)
                if record.status == "rolled back":
                    log.warning("pass %s rolled back: %s", record.text, record.reason)
                    if self.on_error == "raise":
                        raise PassFailedError(record, report)
                    warnings.warn(f"graphopt: pass {record.text} was rolled back: {record.reason}\n"
                                  f"  reproduce: {record.reproduce}", PassRolledBackWarning, stacklevel=3)
        self._each("run_ends", report, program)
        return report

    def _run_one(self, program: Program, p: Pass, index: int, previous_out: Any) -> tuple[PassRecord, Any]:
        """Run, verify and measure one pass; later rows compare with ``self._reference_out`` (the original's
        outputs, or those of the last pass that changed the outputs on purpose)."""
        text = p.label()
        rebased = False
        record = PassRecord(p.name, text, "ok")
        snapshot = program.snapshot()
        program.current_pass, program.current_change = text, p.change
        start = time.perf_counter()
        try:
            if p.needs_calibration and program.calib is None:
                raise ValueError(f"{p.name} needs calibration data: pass calib=<iterable of model inputs> "
                                 f"to optimize() (CLI: --calib)")
            self._each("before_pass", program, p)
            try:
                result = p.run(program, program.analyses)
            finally:
                self._each("after_pass", record, program)
            if not isinstance(result, PassResult):
                raise TypeError(f"{type(p).__name__}.run returned {type(result).__name__}; "
                                f"a pass must return go.PassResult(modified=...)")
            record.seconds = time.perf_counter() - start
            record.stats, record.diagnostics = dict(result.stats), list(result.diagnostics)
            program.analyses.invalidate(result.preserved if result.modified else {"*"})
            if not result.modified:
                record.status = "unchanged"
                if not any(d.level in ("info", "warning", "skipped") for d in result.diagnostics):
                    record.diagnostics.append(Diagnostic("", f"{p.name} changed nothing and gave no reason "
                                                         f"(a pass should say why)", "warning"))
            new_out = previous_out
            if result.modified:
                if result.changes_outputs:
                    new_out = self._outputs(program)
                    if not all(bool(t.isfinite().all()) for t in flatten_outputs(new_out).values()
                               if t.is_floating_point() and t.device.type != "meta"):
                        raise VerificationError("outputs are no longer finite")
                    rebased = True  # errors against the original are undefined: later rows compare with these
                    record.diagnostics.append(Diagnostic(
                        "<outputs>", "output shapes changed on purpose: this row has no error or quality figure, "
                        "and later rows are compared with this pass's outputs", "info"))
                else:
                    new_out, record.step_rel_err = self._verify(program, p, previous_out)
        except BaseException as e:  # a failing pass never takes the model down with it
            record.seconds = time.perf_counter() - start
            program.restore(snapshot)
            if not isinstance(e, Exception):  # an interrupt (Ctrl-C, SystemExit): rolled back, then re-raised
                done = str(self.pipeline[:index]) or "none"
                why = (f"graphopt: pass {text} was interrupted and rolled back; the model is as the passes before "
                       f"it left it (completed: {done})")
                log.warning("%s", why)
                if hasattr(e, "add_note"):
                    e.add_note(why)
                raise
            record.status = "rolled back"
            record.reason = f"{type(e).__name__}: {e}"
            record.reproduce = self._reproducer(index)
            log.debug("pass %s failed:\n%s", text, traceback.format_exc())
            new_out, rebased = previous_out, False
        finally:
            program.current_pass = program.current_change = ""
        if rebased:
            self._reference_out = new_out
        return self._measured(record, program, new_out, self._reference_out, rebased=rebased), new_out

    def _reproducer(self, index: int) -> str:
        prefix = str(self.pipeline[: index + 1])
        return f"graphopt optimize {self.model_spec} --pipeline '{prefix}'"

    def _outputs(self, program: Program) -> Any:
        try:
            return program.run()
        except Exception as e:
            missing = missing_inputs(program.module, program.example_inputs)
            hint = (f"; forward() also takes {', '.join(missing)}, not in the example inputs: pass what the model "
                    "needs" if missing else "")
            raise VerificationError(
                f"the model does not run on its example inputs ({program.example_inputs.describe()}): "
                f"{type(e).__name__}: {e}{hint}") from e

    def _verify(self, program: Program, p: Pass, previous_out: Any) -> tuple[Any, float | None]:
        """Lint, run, and compare with the previous program; return the new outputs and step error."""
        if isinstance(program.module, torch.fx.GraphModule):
            program.module.graph.lint()
        if not self.verify:
            return previous_out, None
        out = self._outputs(program)
        try:
            err = compare_outputs(out, previous_out)
        except OutputMismatch as e:
            raise VerificationError(f"outputs changed shape or structure: {e}") from None
        if not math.isfinite(err.max_rel):
            before = non_finite(previous_out)
            if before:
                raise VerificationError(f"the outputs were not finite before this pass either ({before}): "
                                        f"graphopt cannot verify it; check the model and its example inputs")
            raise VerificationError(f"outputs are no longer finite ({err.worst})")
        tolerance = None if p.tolerance is None else tolerance_for(p.tolerance, program.module, previous_out)
        if tolerance is not None and err.max_rel > tolerance:
            floor = "" if tolerance == p.tolerance else f", widened from {p.tolerance:g} for the model's dtype"
            raise VerificationError(f"output error {err} exceeds the pass's tolerance {tolerance:g}{floor} "
                                    f"(max|new-old| / max|old|)")
        return out, (None if program.device.type == "meta" else err.max_rel)

    def _measured(self, record: PassRecord, program: Program, out: Any, original_out: Any,
                  rebased: bool = False) -> PassRecord:
        """The instruments' measurements of the model after a row's pass (``rebased``: its outputs are the new
        reference, so no error figure)."""
        seen = Seen(program, out, original_out, rebased=rebased,
                    compared=self.verify or record.status == "baseline")
        self._each("measure", record, seen)
        return record
