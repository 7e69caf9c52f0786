"""The optimisation report: one row per pass (plus the original), printable and JSON-able."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..analysis.diagnostics import Diagnostic


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
    latency_ms: float | None = None
    max_abs_err: float | None = None  # vs the original model
    max_rel_err: float | None = None
    step_rel_err: float | None = None  # vs the program before this pass
    cosine: float | None = None  # vs the original: mean row-wise cosine of the worst output
    reason: str = ""
    reproduce: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


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

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "outputs": list(self.outputs), "not_compared": list(self.not_compared),
                "notes": list(self.notes),
                "records": [asdict(r) for r in self.records]}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def __str__(self) -> str:
        header = ["pass", "status", "time s", "params", "weights", "FLOPs", "latency ms", "max abs err", "max rel err",
                  "cosine"]
        rows = []
        for r in self.records:
            rows.append([
                r.text or r.name, r.status, f"{r.seconds:.2f}", _human(r.params), _human(r.weight_bytes, "B"), _human(r.flops),
                "-" if r.latency_ms is None else f"{r.latency_ms:.2f}", _err(r.max_abs_err), _err(r.max_rel_err),
                "-" if r.cosine is None else f"{r.cosine:.4f}",
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
        out += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(out)
