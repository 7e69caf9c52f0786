"""Timing that every stage shares: medians of interleaved runs, the key of the machine a time was taken
on, and :class:`TimingTable`, times measured once per key and kept on disk (LayerMerge's latency table
and the quantized kernels' choice of path both read one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from graphopt.cache import cache_dir

log = logging.getLogger(__name__)


def interleaved_medians(runs: list[Callable[[], object]], repeat: int, warmup: int = 1) -> list[float]:
    """Median seconds of each callable, all run in turn ``repeat`` times after ``warmup`` rounds (so a
    change of machine load hits every one alike: what benchmarks compare side by side). Every other round
    runs them in reverse order, so none always runs right after the same one (caches, clocks)."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for i in range(repeat):
        pairs = list(zip(runs, times))
        for run, out in (pairs if i % 2 == 0 else pairs[::-1]):
            start = time.perf_counter()
            run()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (``None`` or 0: left as it is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_key(device: torch.device) -> str:
    """The machine and thread count a time on ``device`` was taken with: a table measured on one is never
    read on another."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{platform.processor() or platform.node()}:{torch.get_num_threads()}t"


class TimingTable:
    """Values measured once per key and kept as one JSON file under the cache directory
    (``$GRAPHOPT_CACHE/<name>.json``, default ``~/.cache/graphopt``); delete it to measure again."""

    def __init__(self, name: str, path: Path | None = None) -> None:
        self.path = path or cache_dir() / f"{name}.json"
        self.measured = 0
        try:
            self.entries: dict[str, object] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(*parts: object) -> str:
        return json.dumps(list(parts), sort_keys=True)

    def get(self, key: str, measure: Callable[[], object]) -> object:
        """The value stored under ``key``, measured (and stored) on first use."""
        if key not in self.entries:
            self.entries[key] = measure()
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        """Write the table if this process measured anything: merged with what other processes (a second search,
        the ranks under ``torchrun``) wrote since it was read, and replaced in one step, so no reader sees half
        a file and no process's entries are lost."""
        if not self.measured:
            return
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        merged = {**(on_disk if isinstance(on_disk, dict) else {}), **self.entries}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(merged))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("timing table not saved to %s: %s", self.path, e)
