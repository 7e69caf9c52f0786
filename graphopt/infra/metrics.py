"""Model measurements used by the report: parameters, weight bytes, FLOPs, latency."""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn

from ..frontend.inputs import ExampleInputs
from ..frontend.kv_cache import caches_off

log = logging.getLogger(__name__)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements, each shared (tied) tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed quantized codes and their scales included), each
    shared tensor counted once: what the model's tensors take in memory."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *(b for _, b in module.named_buffers())]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


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
    if any(t.device.type == "meta" for t in module.parameters()):
        return None
    sync = torch.cuda.synchronize if any(t.is_cuda for t in module.parameters()) else (lambda: None)
    times: list[float] = []
    with torch.no_grad(), caches_off(module):  # walk the module tree once, not per call
        for _ in range(warmup):
            inputs.call(module)
        sync()
        budget_end = time.perf_counter() + max_seconds
        for _ in range(repeat):
            start = time.perf_counter()
            inputs.call(module)
            sync()
            times.append(time.perf_counter() - start)
            if time.perf_counter() > budget_end and len(times) >= 3:
                break
    return statistics.median(times) * 1e3
