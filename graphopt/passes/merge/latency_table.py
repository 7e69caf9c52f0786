"""Measured latencies of single layers on this device, cached on disk (LayerMerge's latency table).

A layer is keyed by its spec (class and constructor arguments), its input shape, the device and
the thread count, so a table measured on one machine is never used on another. The cache is one
JSON file, ``$GRAPHOPT_CACHE/latency.json`` (default ``~/.cache/graphopt``); delete it to measure again.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch
from torch import nn

from graphopt.cache import cache_dir
from graphopt.frontend.inputs import ExampleInputs
from graphopt.infra.metrics import measure_latency
from graphopt.nn.spec import ModuleSpecError, module_spec

from .layer_math import CONVS, macs

log = logging.getLogger(__name__)


def cache_path() -> Path:
    return cache_dir() / "latency.json"


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{platform.processor() or platform.node()}:{torch.get_num_threads()}t"


class LatencyTable:
    """``ms(layer, input_shape)``: the median latency of one layer, measured once per key."""

    def __init__(self, path: Path | None = None, repeat: int = 20) -> None:
        self.path = path or cache_path()
        self.repeat = repeat
        self.measured = 0
        try:
            self.entries: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def key(self, layer: nn.Module, shape: tuple[int, ...], device: torch.device) -> str:
        try:
            spec = module_spec(layer)
        except ModuleSpecError:
            spec = {"class": type(layer).__name__, "repr": repr(layer)}
        return json.dumps([device_key(device), spec, list(shape)], sort_keys=True)

    def ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        param = next(layer.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        key = self.key(layer, shape, device)
        if key not in self.entries:
            dtype = param.dtype if param is not None else torch.float32
            x = torch.randn(*shape, device=device, dtype=dtype)
            self.entries[key] = measure_latency(layer, ExampleInputs((x,)), warmup=3, repeat=self.repeat)
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries))
        except OSError as e:
            log.warning("latency table not saved to %s: %s", self.path, e)


class MacsCost:
    """The latency table's interface with multiply-adds for cost (millions; activations free): a plan
    that is the same on every run and every device."""

    measured = 0

    def ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        return macs(layer, shape) / 1e6 if isinstance(layer, (nn.Linear, *CONVS)) else 0.0

    def save(self) -> None:
        pass
