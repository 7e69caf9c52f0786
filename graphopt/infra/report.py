"""The optimisation report: one row per pass (plus the original), printable and JSON-able."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.diagnostics import Diagnostic
from ..units import format_bytes
from .metrics import NOISY
from .plots import plot_report


@dataclass
class PassRecord:
    """What one pass did and what the model measured afterwards."""

    name: str
    text: str
    status: str  # "baseline" | "ok" | "unchanged" | "rolled back"
    seconds: float = 0.0
    params: int | None = None
    weight_bytes: int | None = None  # parameters and buffers as stored (packed codes count their bytes)
    flops: int | None = None
    latency_ms: float | None = None  # median of the timed runs
    latency_spread: float | None = None  # their half-IQR, relative to the median
    latency_ratio: float | None = None  # vs the original, timed interleaved with it
    latency_ratio_spread: float | None = None
    threads: int | None = None
    latency_runs: int | None = None  # timed runs behind the median
    max_abs_err: float | None = None  # vs the original model
    max_rel_err: float | None = None
    step_rel_err: float | None = None  # vs the program before this pass
    cosine: float | None = None  # vs the original: mean row-wise cosine of the worst output
    quality: float | None = None  # the task-aware figure (graphopt.infra.quality), on ``quality_data``
    quality_name: str = ""
    quality_data: str = ""  # "<n> held-out samples" | "the example inputs"
    reason: str = ""
    reproduce: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: figures of instruments beyond the standard columns (``PassMemory``'s ``peak MiB``, a user's own)
    measures: dict[str, float] = field(default_factory=dict)


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _latency(ms: float | None, spread: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.2f} ±{_pct(spread or 0.0)}" + (" noisy" if (spread or 0) > NOISY else "")


def _ratio(r: PassRecord) -> str:
    if r.latency_ratio is None:
        return "-"
    spread = r.latency_ratio_spread or 0.0
    return f"x{r.latency_ratio:.2f} ±{_pct(spread)}" + (" noisy" if spread > NOISY else "")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def _change(a: float, b: float) -> str:
    return "same" if a == b else f"{100 * (b - a) / a:+.1f}%" if a else "-"


LEGEND = ("columns: time s = the pass's run time; params / weights / FLOPs = parameter count, bytes of every "
          "tensor held, FLOPs of one forward on the example inputs; latency ms = median of timed forwards of the "
          "nn.Module in PyTorch eager on this machine (± half the interquartile range; 'noisy' above 10%; an "
          "ONNX export runs in onnxruntime, whose figures its own report gives); vs original = median ratio to "
          "the original model, timed in turn with it; max abs/rel err and cosine = outputs against the "
          "original's on the example inputs only (rel: max|new - old| / max|old|; cosine: mean over output "
          "rows); quality = the figure named below the table, against the original (1 = the same), the one to "
          "judge a lossy pass (prune, dyt, quantize) by; 'ok' means it ran and was verified.")


@dataclass
class Report:
    """Rows for the original model and each pass, in order."""

    records: list[PassRecord] = field(default_factory=list)
    pipeline: str = ""
    #: the tensor outputs verification compares (``name[shape]``), and what the model returns but is not compared
    outputs: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    #: facts about the result as a whole (e.g. why ``save_pretrained`` would refuse it)
    notes: list[str] = field(default_factory=list)

    @property
    def passes(self) -> list[PassRecord]:
        return [r for r in self.records if r.status != "baseline"]

    @property
    def failed(self) -> list[PassRecord]:
        return [r for r in self.records if r.status == "rolled back"]

    @property
    def ok(self) -> bool:
        """True when no pass was rolled back."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "outputs": list(self.outputs), "not_compared": list(self.not_compared),
                "notes": list(self.notes),
                "records": [asdict(r) for r in self.records]}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def __str__(self) -> str:
        extra = list(dict.fromkeys(k for r in self.records for k in r.measures))
        header = ["pass", "status", "time s", "params", "weights", "FLOPs", "latency ms", "vs original",
                  "max abs err", "max rel err", "cosine", "quality", *extra]
        rows = []
        for r in self.records:
            rows.append([
                r.text or r.name, r.status, f"{r.seconds:.2f}", _human(r.params), format_bytes(r.weight_bytes),
                _human(r.flops), _latency(r.latency_ms, r.latency_spread), _ratio(r),
                _err(r.max_abs_err), _err(r.max_rel_err), "-" if r.cosine is None else f"{r.cosine:.4f}",
                "-" if r.quality is None else f"{r.quality:.4f}",
                *("-" if k not in r.measures else f"{r.measures[k]:.4g}" for k in extra),
            ])
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
        out = []
        if self.outputs:
            out.append("outputs compared: " + ", ".join(self.outputs)
                       + (f" (not compared: {', '.join(self.not_compared)})" if self.not_compared else ""))
        out += [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        for r in self.records:
            extra = []
            if r.reason:
                extra.append(f"  why: {r.reason}")
            if r.reproduce:
                extra.append(f"  reproduce: {r.reproduce}")
            if r.stats:
                extra.append("  stats: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in r.stats.items()))
            extra += [f"  {d}" for d in r.diagnostics[:20]]
            if len(r.diagnostics) > 20:
                extra.append(f"  ... {len(r.diagnostics) - 20} more diagnostics (see report.to_dict())")
            if extra:
                out.append(f"\n{r.text or r.name}:")
                out += extra
        named = next((r for r in self.records if r.quality_name), None)
        if named is not None:
            out.append(f"\nquality: {named.quality_name} against the original, on {named.quality_data}")
        out += [f"\nnote: {n}" for n in self.notes]
        out += ["", textwrap.fill(LEGEND, 110), "", self.summary()]
        return "\n".join(out)

    def plot(self, path: str | Path) -> Path:
        """Draw quality against latency and weight size, per pass (needs matplotlib: ``graphopt[plot]``)."""
        return plot_report(self, path)

    def summary(self) -> str:
        """One line: the original against the last model, for every measured quantity."""
        if not self.records:
            return "summary: nothing ran"
        first, last = self.records[0], self.records[-1]
        parts = [f"{name} {show(a)} -> {show(b)} ({_change(a, b)})"
                 for name, a, b, show in (("params", first.params, last.params, _human),
                                          ("FLOPs", first.flops, last.flops, _human),
                                          ("weights", first.weight_bytes, last.weight_bytes, format_bytes))
                 if a is not None and b is not None]
        if last.latency_ratio is not None:
            parts.append(f"latency {_ratio(last)} on {last.threads} thread{'s' if last.threads != 1 else ''}")
        if last.quality is not None and last is not first:
            parts.append(f"{last.quality_name} {last.quality:.4f} (on {last.quality_data})")
            parts += [f"{key} {last.measures[key]:.4f}" for key in ("ppl ratio", "top-5") if key in last.measures]
        elif last.cosine is not None and last is not first:
            parts.append(f"output cosine {last.cosine:.4f}")
        failed = f"; {len(self.failed)} pass(es) rolled back" if self.failed else ""
        return "summary: " + (", ".join(parts) if parts else "not measured") + failed
