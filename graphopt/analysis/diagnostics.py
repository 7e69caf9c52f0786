"""Diagnostics: what an analysis or a pass wants the user to know (a layer left alone, and why)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Diagnostic:
    """Something a pass wants the user to know: usually a module it left alone, and why."""

    target: str
    message: str
    level: str = "skipped"  # "skipped" | "info" | "warning"

    def __str__(self) -> str:
        return f"[{self.level}] {self.target}: {self.message}" if self.target else f"[{self.level}] {self.message}"
