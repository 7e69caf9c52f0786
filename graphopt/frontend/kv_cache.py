"""KV caches off for graphopt's own runs of a model, and the user's setting back afterwards.

A HuggingFace decoder built with its default config returns a KV cache (``DynamicCache``,
``EncoderDecoderCache``) from every forward in eval mode. graphopt's runs (capture, verification,
calibration, latency, ONNX export) only need the tensors a user reads (logits, hidden states), and a
cache object cannot be captured by torch.export nor compared. So while graphopt runs the model,
every config in the module tree that has ``use_cache`` reads ``False``; on exit each gets its own
value back, so the model the user holds (and ``generate()``) keeps the cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

_active = threading.local()


def cache_configs(module: nn.Module) -> list[Any]:
    """The distinct config objects of ``module``'s tree that have a boolean ``use_cache``."""
    seen: dict[int, Any] = {}
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is not None and isinstance(getattr(config, "use_cache", None), bool):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def caches_off(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module`` (and every config in its tree) runs with ``use_cache=False``.

    Re-entrant and cheap when nested for the same module (the tree is walked once).
    """
    active: set[int] = getattr(_active, "ids", None) or set()
    _active.ids = active
    if id(module) in active:
        yield
        return
    saved = [(c, c.use_cache) for c in cache_configs(module)]
    for config, _ in saved:
        config.use_cache = False
    active.add(id(module))
    try:
        yield
    finally:
        active.discard(id(module))
        for config, value in saved:
            config.use_cache = value


def returned_cache(output: Any) -> Any:
    """The KV cache a HF model's output holds (``cache`` from transformers 5.25, ``past_key_values`` before),
    or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
