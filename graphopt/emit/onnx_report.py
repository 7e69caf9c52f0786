"""What an ONNX export produced and how it was verified: :class:`ExportReport` and the errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..units import format_bytes


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX (the message says which step failed and what to try)."""


class OnnxVerificationError(OnnxExportError):
    """The exported file failed ``onnx.checker`` or disagreed with torch in onnxruntime.

    ``failed_path`` is where the file was moved (``<path>.failed``), or ``None`` if nothing was written.
    """

    def __init__(self, message: str, failed_path: Path | None = None) -> None:
        super().__init__(message)
        self.failed_path = failed_path


@dataclass(frozen=True)
class VerifiedRun:
    """One onnxruntime run compared with torch: the inputs used and the largest absolute error."""

    inputs: str
    max_abs_error: float


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it was verified; usable as a path (``os.fspath``)."""

    path: Path
    opset: int
    size_bytes: int
    inputs: dict[str, tuple[int | str, ...]]
    outputs: dict[str, tuple[int | str, ...]]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    runs: tuple[VerifiedRun, ...] = ()
    external_data: bool = False
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    #: weight-only QDQ files: the max abs error vs torch in a plain InferenceSession (no session option), which
    #: onnxruntime runs at accuracy level 4; ``runs`` were verified with the option graphopt sets
    plain_session_error: float | None = None

    @property
    def verified(self) -> bool:
        return bool(self.runs)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.runs), default=float("nan"))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        def sig(items: dict[str, tuple[int | str, ...]]) -> str:
            return ", ".join(f"{k}[{', '.join(map(str, v))}]" for k, v in items.items())

        lines = [f"wrote {self.path} (opset {self.opset}, {format_bytes(self.size_bytes)}"
                 + (", external data" if self.external_data else "") + f", {self.seconds:.1f}s)",
                 f"  inputs:  {sig(self.inputs)}", f"  outputs: {sig(self.outputs)}"]
        lines += [f"  onnxruntime == torch on {r.inputs}: max abs error {r.max_abs_error:.2e}"
                  for r in self.runs]
        if not self.runs:
            lines.append("  NOT verified in onnxruntime (check=False)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def first_lines(exc: BaseException, limit: int = 6) -> str:
    """The useful part of an exporter error: the exception summary when torch gives one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = re.search(r"## Exception summary\s*\n(.*?)(\n\n\(Refer|\Z)", text, re.S)
    body = summary.group(1).strip() if summary else text.strip()
    lines = [ln for ln in body.splitlines() if ln.strip()][:limit]
    return "\n    ".join(lines) or type(exc).__name__
