"""One unit for sizes everywhere graphopt prints them: binary (KiB, MiB, GiB), as memory and files are measured."""

from __future__ import annotations

MIB = 2**20
GIB = 2**30


def format_bytes(n: float | None) -> str:
    """``90860544`` -> ``'86.65 MiB'``; ``None`` -> ``'-'``."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
