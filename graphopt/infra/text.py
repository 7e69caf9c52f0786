"""Pipeline text pieces shared by the pass contract, the registry and the parser.

:class:`PipelineError`, name suggestions, and the canonical formatting of option values and passes
(``format_pass(p)`` is what ``str(pass)`` and ``str(pipeline)`` print).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any


class PipelineError(ValueError):
    """A pipeline text or list names an unknown pass/option or gives a value of the wrong type."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' for the closest of ``choices`` (or the list of choices)."""
    choices = sorted(choices)
    close = get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid names: {', '.join(choices)}" if choices else ""


_BARE = re.compile(r"[A-Za-z_*?.\-/][\w*?.\-/]*")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        bare_ok = _BARE.fullmatch(value) and value.lower() not in ("true", "false", "none", "null")
        if bare_ok:
            try:
                float(value)
            except ValueError:
                return value
        return repr(value)
    return repr(value)


def format_pass(p: Any, always: tuple[str, ...] = ()) -> str:
    """Canonical text of one configured pass: options that differ from the defaults, and those named in
    ``always`` (unless None), in field order."""
    opts = p.options()
    if always:
        every = p.options(all=True)
        opts = {k: v for k, v in every.items() if k in opts or (k in always and v is not None)}
    if not opts:
        return p.name
    return f"{p.name}(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns (what the benchmark scripts print)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
