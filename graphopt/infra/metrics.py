"""Model measurements used by the report: parameters, weight bytes, FLOPs, latency."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..frontend.inputs import ExampleInputs, as_example_inputs, flatten_outputs
from ..frontend.kv_cache import caches_off
from ..nn.quant import PackedLayer
from ..progress import track
from .program import swapped_modules

log = logging.getLogger(__name__)
K = TypeVar("K")


def count_params(module: nn.Module) -> int:
    """Number of parameter elements, each shared (tied) tensor counted once; a quantized layer counts
    the weights its packed codes stand for (a parameter count, not a byte count: see count_weight_bytes)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in module.modules():
        if isinstance(m, PackedLayer):
            total += m.weight_count
    return total


def count_weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed quantized codes and their scales included), each
    shared tensor counted once: what the model's tensors take in memory."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *(b for _, b in module.named_buffers())]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's and optimum-quanto's quantized weights) counts the
    tensors it is made of (``__tensor_flatten__``), not ``numel * element_size`` of the dtype it presents."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names)


def count_flops(module: nn.Module, inputs: ExampleInputs) -> int | None:
    """FLOPs of one forward pass on ``inputs`` (torch's FlopCounterMode); None if it cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            inputs.call(module)
        return int(counter.get_total_flops())
    except Exception as e:  # counting is best effort: a model that runs may still confuse the counter
        log.debug("FLOP counting failed: %s", e)
        return None


def measure_latency(module: nn.Module, inputs: ExampleInputs, *, warmup: int = 2, repeat: int = 10,
                    max_seconds: float = 5.0) -> float | None:
    """Median wall time of one forward pass in milliseconds (None on the meta device)."""
    lat = measure_latencies(module, inputs, warmup=warmup, repeat=repeat, max_seconds=max_seconds)
    return None if lat is None else lat.ms


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward pass, with the spread of the runs and how they were taken."""

    ms: float
    spread: float  # half the interquartile range, relative to the median
    runs: int
    threads: int
    ratio: float | None = None  # vs the reference model, timed interleaved; None for the reference itself
    ratio_spread: float | None = None
    reference_ms: float | None = None

    @property
    def noisy(self) -> bool:
        """More than 10% spread: a number to re-measure, not a fact."""
        return max(self.spread, self.ratio_spread or 0.0) > NOISY


#: relative spread above which a latency is labelled noisy
NOISY = 0.10


def _half_iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) / 2 / statistics.median(xs) if xs else 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(xs)


def _runner(module: nn.Module, inputs: ExampleInputs) -> Callable[[], None]:
    sync = torch.cuda.synchronize if any(t.is_cuda for t in module.parameters()) else (lambda: None)

    def run() -> None:
        inputs.call(module)
        sync()

    return run


def measure_latencies(module: nn.Module, inputs: ExampleInputs, reference: nn.Module | None = None, *,
                      warmup: int = 2, repeat: int = 10, max_seconds: float = 5.0) -> Latency | None:
    """Time ``module`` (and ``reference``, run in turn with it so drift hits both) on ``inputs``.

    Returns the median, its relative half-IQR, and, with a reference, the median of the per-round
    ratios ``module / reference`` and its spread. None on the meta device.
    """
    models = [module] + ([reference] if reference is not None else [])
    if any(t.device.type == "meta" for m in models for t in m.parameters()):
        return None
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for m in models:  # walk each module tree once, not per call
            stack.enter_context(caches_off(m))
        runs = [_runner(m, inputs) for m in models]
        for _ in range(warmup):
            for run in runs:
                run()
        budget_end = time.perf_counter() + max_seconds
        for _ in range(repeat):
            for run, out in zip(runs, times):
                start = time.perf_counter()
                run()
                out.append(time.perf_counter() - start)
            if time.perf_counter() > budget_end and len(times[0]) >= 3:
                break
    ms = statistics.median(times[0]) * 1e3
    threads = torch.get_num_threads()
    if reference is None:
        return Latency(ms, _half_iqr(times[0]), len(times[0]), threads)
    ratios = [a / b for a, b in zip(times[0], times[1])]
    return Latency(ms, _half_iqr(times[0]), len(times[0]), threads, statistics.median(ratios), _half_iqr(ratios),
                   statistics.median(times[1]) * 1e3)


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC: Any = None
M_MMAP_THRESHOLD = -3


def give_back_memory() -> None:
    """Return the C allocator's free memory to the system (glibc's ``malloc_trim``; nothing elsewhere): tensors freed
    between blocks leave holes in its heap that count as resident until trimmed."""
    if libc := _libc():
        libc.malloc_trim(0)


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside, glibc maps every allocation of ``threshold`` bytes or more on its own, so that freeing it returns it
    to the system at once (by default glibc raises its threshold up to 32 MiB as large blocks are freed, and
    serves those from a heap that keeps them), for work that must stay within a memory bound (a model streamed
    from disk). On exit the threshold is 32 MiB, where glibc's own settles for a process that frees large
    tensors (its adjustment, once turned off, cannot be turned back on)."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if libc:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)


class PeakMemory:
    """Peak resident memory of this process above its level at entry, sampled by a thread (Linux ``/proc``).

    ``with PeakMemory() as peak: ...`` then ``peak.bytes``. Memory the allocator kept from earlier work
    is counted as already there, so measure in a fresh process for a figure that compares runs.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.bytes, self._start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident() -> int:
        """Resident bytes of this process now (0 where ``/proc/self/statm`` does not exist)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, self.resident() - self._start)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._start = self.resident()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, self.resident() - self._start)


@torch.no_grad()
def output_changes(model: nn.Module, swaps: Mapping[K, Callable[[], Mapping[str, nn.Module]]], batches: Sequence[Any],
                   label: str = "", figure: Figure | None = None) -> dict[K, float]:
    """For each key, how much ``model``'s outputs on ``batches`` change with the modules its function builds
    swapped in (alone, built when their turn comes: :func:`~graphopt.infra.program.swapped_modules`): by default
    the squared change of the float outputs relative to their squared norm (what
    :func:`graphopt.analysis.probes.fisher_diagonal` estimates from a weight change); with ``figure``, its
    ``(summary of one batch's outputs, loss of the swapped summaries against the reference's)``."""
    summary, loss = figure or (_float_outputs, _relative_change)
    examples = [as_example_inputs(b) for b in batches]

    def summaries() -> list[Any]:
        return [summary(x.call(model), x) for x in examples]

    reference = summaries()
    changes: dict[K, float] = {}
    for key in track(list(swaps), label or "output change of each swap", unit="swap"):
        with swapped_modules(model, dict(swaps[key]())):
            changes[key] = loss(summaries(), reference)
    return changes


#: how :func:`output_changes` compares outputs: a batch's outputs (and its inputs) -> a summary; summaries -> a loss
Figure = tuple[Callable[[Any, ExampleInputs], Any], Callable[[list[Any], list[Any]], float]]


def _float_outputs(outputs: Any, _inputs: ExampleInputs) -> list[torch.Tensor]:
    return [t.float() for t in flatten_outputs(outputs).values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_change(now: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> float:
    energy = sum(float(r.pow(2).sum()) for batch in reference for r in batch) or 1.0
    return sum(float((o - r).pow(2).sum()) for a, b in zip(now, reference) for o, r in zip(a, b)) / energy
