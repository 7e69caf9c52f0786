"""Where the CLI writes (report on stdout, progress and errors on stderr), and its usage error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

#: calibration texts read by default: all of the stdlib docstrings' calibration split (1928 texts), since
#: heal's recipes were measured on all of it (benchmarks/heal.py); a longer --calib file is sampled
DEFAULT_CALIB_SIZE = 2048
#: calibration samples of a model with its own data (photo views: each one a forward of a 224x224 image)
DEFAULT_CALIB_IMAGES = 256
#: held-out docstrings for the report's quality figure (prune_zoo.py's --eval-texts)
DEFAULT_EVAL_SIZE = 256


class UsageError(Exception):
    """Bad input from the command line: reported in one line with exit status 2."""


class Console:
    """Where the CLI writes: report on ``out``, progress and errors on ``err``."""

    def __init__(self, out: TextIO, err: TextIO, quiet: bool = False, verbose: int = 0) -> None:
        self.out, self.err, self.quiet, self.verbose = out, err, quiet, verbose

    def print(self, *parts: Any) -> None:
        print(*parts, file=self.out)

    @contextmanager
    def step(self, what: str, done: str = "") -> Iterator[None]:
        """``what ...`` on stderr, then the seconds it took: on the same line, or (when the step shows
        progress bars of its own) on a line ``done`` of its own."""
        if not self.quiet:
            print(f"{what} ...", end="\n" if done else "", file=self.err, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(f"{what} failed" if done else " failed", file=self.err, flush=True)
            raise
        if not self.quiet:
            took = f"{time.perf_counter() - start:.1f}s"
            print(f"{done} in {took}" if done else f" {took}", file=self.err, flush=True)
