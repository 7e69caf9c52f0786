"""Measured latencies of single layers on this device, cached on disk (LayerMerge's latency table).

A layer is keyed by its spec (class and constructor arguments), its input shape, the device and
the thread count, so a table measured on one machine is never used on another. The cache is one
JSON file, ``$GRAPHOPT_CACHE/latency.json`` (default ``~/.cache/graphopt``); delete it to measure again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graphopt.frontend.inputs import ExampleInputs
from graphopt.infra.metrics import measure_latency
from graphopt.nn.spec import ModuleSpecError, module_spec
from graphopt.timing import TimingTable, device_key

from .layer_math import CONVS, macs


class LatencyTable(TimingTable):
    """``ms(layer, input_shape)``: the median latency of one layer, measured once per key."""

    def __init__(self, path: Path | None = None, repeat: int = 20) -> None:
        super().__init__("latency", path)
        self.repeat = repeat

    def layer_key(self, layer: nn.Module, shape: tuple[int, ...], device: torch.device) -> str:
        try:
            spec = module_spec(layer)
        except ModuleSpecError:
            spec = {"class": type(layer).__name__, "repr": repr(layer)}
        return self.key(device_key(device), spec, list(shape))

    def ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        param = next(layer.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32

        def measure() -> float | None:
            x = torch.randn(*shape, device=device, dtype=dtype)
            return measure_latency(layer, ExampleInputs((x,)), warmup=3, repeat=self.repeat)

        return self.get(self.layer_key(layer, shape, device), measure)  # type: ignore[return-value]


class MacsCost:
    """The latency table's interface with multiply-adds for cost (millions; activations free): a plan
    that is the same on every run and every device."""

    measured = 0

    def ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        return macs(layer, shape) / 1e6 if isinstance(layer, (nn.Linear, *CONVS)) else 0.0

    def save(self) -> None:
        pass
