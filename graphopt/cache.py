"""Where graphopt keeps what it measured or converted once (a latency table, models converted from GGUF):
``$GRAPHOPT_CACHE``, default ``~/.cache/graphopt``. Deleting it only costs the work again."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory (not created here)."""
    return Path(os.environ.get("GRAPHOPT_CACHE") or Path.home() / ".cache" / "graphopt")
