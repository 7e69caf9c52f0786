"""Measured latencies of single layers, on a runtime and a thread count, cached on disk: LayerMerge's latency
table and the goal search's cost model read this one table.

A layer is keyed by what decides its speed and nothing else: its spec (class and constructor arguments, or its
class and ``repr``), the shape, dtype and layout (strides) of each of its tensors, the shapes and dtypes of its
inputs, the runtime, the machine and the thread count; so a table measured on one machine is never read on
another, and two layers that differ only in their weights' values share an entry. The cache is one JSON file,
``$GRAPHOPT_CACHE/latency.json`` (default ``~/.cache/graphopt``); delete it to measure again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from graphopt.frontend.inputs import ExampleInputs
from graphopt.nn.spec import ModuleSpecError, module_spec
from graphopt.timing import TimingTable, device_key, interleaved_medians, num_threads

log = logging.getLogger(__name__)

#: how one layer runs on a runtime other than torch: ``(layer, inputs, threads) -> one call``
Runner = Callable[[nn.Module, ExampleInputs, int], Callable[[], None]]
#: a layer's inputs as the table keys them: (shape, dtype name) per positional tensor
Signature = tuple[tuple[tuple[int, ...], str], ...]


class LatencyTable(TimingTable):
    """``ms(layer, shape)`` and ``ms_of(layer, signature)``: the median milliseconds of one call of one layer,
    measured once per key (``None``: the layer could not be run alone on the runtime, said in the log)."""

    repeat = 20  # timing rounds of a layer: at least
    seconds = 0.2  # and enough for about this long

    def __init__(self, path: Path | None = None) -> None:
        super().__init__("latency", path)

    def layer_key(self, layer: nn.Module, inputs: Sequence[object], runtime: str = "torch",
                  threads: int | None = None) -> str:
        try:
            spec: object = module_spec(layer)
        except ModuleSpecError:
            spec = {"class": f"{type(layer).__module__}.{type(layer).__qualname__}", "repr": repr(layer)}
        tensors = [[n, list(t.shape), str(t.dtype), list(t.stride())]
                   for n, t in [*layer.named_parameters(), *layer.named_buffers()]]
        device = _device(layer)
        with num_threads(threads):
            machine = device_key(device)
        return self.key(runtime, machine, spec, tensors, list(inputs))

    def ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        """One layer on torch at the current thread count, on a float input of ``shape`` (LayerMerge's cost)."""
        dtype = next((p.dtype for p in layer.parameters()), torch.float32)
        return self.ms_of(layer, ((tuple(shape), str(dtype).removeprefix("torch.")),)) or 0.0

    def ms_of(self, layer: nn.Module, signature: Signature, *, runtime: str = "torch", threads: int | None = None,
              runner: Runner | None = None) -> float | None:
        """One layer on inputs of ``signature`` (random floats, zeros for integer inputs) with ``threads``
        (default: the current count); ``runner`` runs it on a runtime other than torch."""
        def measure() -> float | None:
            inputs = ExampleInputs(tuple(_tensor(shape, dtype, _device(layer)) for shape, dtype in signature))
            sync = torch.cuda.synchronize if _device(layer).type == "cuda" and runner is None else (lambda: None)
            try:
                with num_threads(threads), torch.no_grad():
                    run = runner(layer, inputs, threads or torch.get_num_threads()) if runner else \
                        (lambda: (inputs.call(layer), sync()))
                    return 1e3 * self._median(run)
            except Exception as e:  # noqa: BLE001 - a layer that does not run alone is costed with the rest
                log.info("latency table: %s on %s not measured alone: %s", type(layer).__name__, runtime, e)
                return None

        return self.get(self.layer_key(layer, [list(map(list, s)) for s in signature], runtime, threads),
                        measure)  # type: ignore[return-value]

    def _median(self, run: Callable[[], object]) -> float:
        """Seconds of one call: the median of enough rounds for about ``self.seconds`` (at least ``repeat``)."""
        run()
        t0 = time.perf_counter()
        run()
        once = max(time.perf_counter() - t0, 1e-7)
        rounds = int(min(500, max(self.repeat, self.seconds / once)))
        return interleaved_medians([run], rounds, warmup=1)[0]


def signature_of(args: Sequence[object]) -> Signature | None:
    """The table's key for a call's positional inputs; None when one is not a tensor (the layer is not timed
    alone: its cost stays with the rest of the model)."""
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple((tuple(a.shape), str(a.dtype).removeprefix("torch.")) for a in args)  # type: ignore[union-attr]


def _tensor(shape: Sequence[int], dtype: str, device: torch.device) -> torch.Tensor:
    kind = getattr(torch, dtype)
    if kind.is_floating_point:
        return torch.randn(*shape, dtype=kind, device=device)
    return torch.zeros(*shape, dtype=kind, device=device)


def _device(layer: nn.Module) -> torch.device:
    t = next(iter([*layer.parameters(), *layer.buffers()]), None)
    return t.device if t is not None else torch.device("cpu")

