"""Progress of long work: a bar on a terminal, and log lines wherever the output goes.

A bar is invisible in a CI log, a file or a pipe (tqdm turns itself off there), so work that takes long
also writes lines to the ``graphopt.progress`` logger at INFO: one when it has run ``every`` seconds
(and each ``every`` seconds after), with what is done, the elapsed time and an estimate of what remains,
and one when it ends if it wrote any before. Short work writes nothing. The CLI shows these lines
unless ``-q``; a library user sees them with ``logging.basicConfig(level=logging.INFO)``.

    with Progress("heal", total=steps, unit="step") as p:
        for step in range(steps):
            ...
            p.update(loss=f"{loss:.4g}")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("graphopt.progress")
T = TypeVar("T")

#: seconds between two progress lines of the same work (GRAPHOPT_PROGRESS_EVERY overrides it)
EVERY = float(os.environ.get("GRAPHOPT_PROGRESS_EVERY", "30"))


def _seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _plural(n: int, unit: str) -> str:
    if n == 1:
        return unit
    return f"{unit}es" if unit.endswith(("s", "x", "ch", "sh")) else f"{unit}s"


class Progress:
    """A counter of one piece of long work: a tqdm bar (``bar``: None shows it on a terminal only) and log lines."""

    def __init__(self, what: str, total: int | None = None, unit: str = "step", *, bar: bool | None = None,
                 every: float | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every = EVERY if every is None else every
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.lines = 0
        self.postfix: dict[str, Any] = {}
        self._bar = tqdm(total=total, desc=what, unit=unit, leave=False, disable=None if bar is None else not bar)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss="0.12"``) is shown beside the bar and in the lines."""
        self.done += n
        if postfix:
            self.postfix.update(postfix)
            self._bar.set_postfix(self.postfix, refresh=False)
        self._bar.update(n)
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self.lines += 1
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``heal: 300/1200 steps (25%), 61 s elapsed, about 3.1 min left, loss=0.12``."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        unit = _plural(self.total or self.done, self.unit)
        parts = [f"{self.what}: {self.done}/{self.total} {unit} ({100 * self.done / self.total:.0f}%)"
                 if self.total else f"{self.what}: {self.done} {unit}", f"{_seconds(elapsed)} elapsed"]
        if self.total and self.done:
            parts.append(f"about {_seconds(elapsed * (self.total - self.done) / self.done)} left")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        self._bar.close()
        if self.lines:  # long work says when it ended; short work stays quiet
            elapsed = time.perf_counter() - self.start
            log.info("%s: %d %s in %s", self.what, self.done, _plural(self.done, self.unit), _seconds(elapsed))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], what: str, total: int | None = None, unit: str = "step", *,
          bar: bool | None = None, every: float | None = None) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(what, total, unit, bar=bar, every=every) as p:
        for item in items:
            yield item
            p.update()
