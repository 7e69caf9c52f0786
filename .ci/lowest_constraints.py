"""Print pip constraints that pin each bounded dependency of pyproject.toml to its lowest version.

A dependency with both a lower and an upper bound (``transformers>=5.23,<5.26``) has a tested range; CI
tests the newest versions in it (``make test``) and, with these pins, the lowest (``make test-oldest``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lowest_pins(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==low`` for every quoted requirement ``"name>=low,<high"`` (read as text: Python 3.10 has no tomllib)."""
    pattern = r'"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*,\s*<\s*[0-9][0-9.]*"'
    pins = {name.lower(): f"{name}=={low}" for name, low in re.findall(pattern, pyproject.read_text())}
    return sorted(pins.values())


if __name__ == "__main__":
    sys.stdout.write("".join(f"{pin}\n" for pin in lowest_pins()))
