"""``backend="auto"`` on CPU: the fastest path for a layer's format and input shape, measured on this machine.

Each key (machine and thread count, torch version, the paths' version, scheme, group size, activations,
dtype, input rows rounded up to a power of two, in and out features) is timed once, every candidate path
against the reference (interleaved medians), and kept in ``$GRAPHOPT_CACHE/quant_backends.json`` with all
the times, so the choice can be read and checked: the pick is the fastest in its own row, and the reference
is always a candidate, so ``auto`` never picks a path slower than the reference as measured. While a model
is traced (``torch.compile``, ``torch.export``) nothing is timed: the trace takes the path last picked
eagerly for the layer's shape, or the reference if none was, so run the model once eagerly first. Under
``torch.compile`` one row of a weight-only layer takes the reference, which traces as one reduction over
the packed codes (:func:`graphopt.kernels.quant.one_row_linear`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from graphopt.timing import TimingTable, device_key, interleaved_medians

from .quant import one_row_reduces, quant_linear_impl
from .quant_cpu import CPU_BACKENDS, why_not

log = logging.getLogger(__name__)

#: input rows are rounded up to a power of two up to this, and capped at it
MAX_ROWS = 4096
#: seconds each candidate is timed for (at least 5 runs)
BUDGET_S = 0.03
#: part of every key: raised whenever a path's code changes, so that timings of the old code are not reused
#: (2: oneDNN given uint8 activations)
PATHS_VERSION = 2

_table: TimingTable | None = None
_chosen: dict[tuple, str] = {}  # this process's picks, without building the table's key again
_last_pick: dict[tuple, str] = {}  # the same without the thread count: what torch.compile traces


def table() -> TimingTable:
    """The process's table of measured paths (read from the cache directory on first use)."""
    global _table
    if _table is None:
        _table = TimingTable("quant_backends")
    return _table


def candidates(scheme: str, group_size: int, activations: str) -> list[str]:
    """The reference first, then every CPU path that can run this format."""
    return ["torch"] + [b for b in CPU_BACKENDS if why_not(b, scheme, group_size, activations) is None]


def table_key(x: Tensor, scheme: str, group_size: int, activations: str, in_features: int,
              out_features: int) -> str:
    """The table's key for a layer's format and an input like ``x`` (see the module docstring)."""
    return TimingTable.key(device_key(x.device), torch.__version__, PATHS_VERSION, scheme, group_size, activations,
                           str(x.dtype), row_bucket(math.prod(x.shape[:-1])), in_features, out_features)


def row_bucket(rows: int) -> int:
    return min(MAX_ROWS, 1 << max(0, rows - 1).bit_length())


def _tracing(x: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or x.device.type == "meta"


def auto_cpu_backend(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
                     activations: str) -> str:
    """The backend ``auto`` runs a CPU input ``x`` on (see the module docstring)."""
    rows = math.prod(x.shape[:-1])
    if not isinstance(rows, int):  # a symbolic batch: one graph for every shape, the reference's
        return "torch"
    layer = (scheme, group_size, activations, x.dtype, row_bucket(rows), in_features, qweight.shape[0])
    if torch.compiler.is_compiling():  # no thread count (a graph break in dynamo), no timing: the eager pick,
        if activations == "none" and one_row_reduces(x, scheme, group_size, in_features):  # but the reference's
            return "torch"  # reduction for one row (quant.one_row_linear): 2.4x less time than int_mm (measured)
        return _last_pick.get(layer, "torch")
    memo = (torch.get_num_threads(), *layer)
    if (chosen := _chosen.get(memo)) is not None:
        return chosen
    options = candidates(scheme, group_size, activations)
    if len(options) == 1:
        return "torch"
    if _tracing(x):  # fake tensors outside dynamo (non-strict export): nothing to time
        return _last_pick.get(layer, "torch")
    key = table_key(x, scheme, group_size, activations, in_features, qweight.shape[0])
    store = table()
    entry = store.get(key, lambda: measure_paths(options, row_bucket(rows), x.dtype, qweight, scale, scheme,
                                                 group_size, in_features, activations))
    if store.measured:
        store.save()
        store.measured = 0
    _chosen[memo] = _last_pick[layer] = entry["best"]  # type: ignore[index]
    return _chosen[memo]


def measure_paths(options: list[str], rows: int, dtype: torch.dtype, qweight: Tensor, scale: Tensor, scheme: str,
                  group_size: int, in_features: int, activations: str) -> dict[str, object]:
    """``{"ms": {backend: median ms}, "best": fastest}`` for ``rows`` random input rows."""
    x = torch.randn(rows, in_features, dtype=dtype, generator=torch.Generator().manual_seed(0))
    scale = scale.to(dtype)
    runs = [lambda b=b: quant_linear_impl(x, qweight, scale, scheme, group_size, in_features, activations, b)
            for b in options]
    with torch.no_grad():
        once = interleaved_medians(runs, repeat=1, warmup=1)
        repeat = max(5, min(50, int(BUDGET_S / max(max(once), 1e-6))))
        medians = interleaved_medians(runs, repeat=repeat, warmup=1)
    ms = {b: round(t * 1e3, 5) for b, t in zip(options, medians)}
    best = min(options, key=lambda b: ms[b])
    log.debug("quantized layer %d x %d (%s, %s, %d rows): %s -> %s", in_features, qweight.shape[0], scheme,
              activations, rows, ms, best)
    return {"ms": ms, "best": best}
