"""The saved-model format (constants, error, shared helpers); :mod:`.save` writes it and :mod:`.load` reads it.

A saved directory holds two files and nothing that is ever unpickled:

* ``model.safetensors``: every tensor of the model. Tied tensors are stored once (the JSON maps
  the other names to it) and non-persistent buffers are stored too, so a base model built on the
  ``meta`` device comes back with real values everywhere.
* ``graphopt.json``: format version, the base model's class (and HF config), the pipeline and a
  report summary, the tensor aliases, and the Program's edit log.

:func:`load` replays the edit log on the caller's freshly built base model with
:func:`graphopt.infra.program.replay_edits`, then assigns the weights to the result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "graphopt.saved_model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
#: the weights' safetensors metadata key holding the save id the manifest names (one save wrote both)
SAVE_ID_KEY = "graphopt_save_id"
MANIFEST_FILE = "graphopt.json"
SHOW = 5  # how many names an error message lists


class SerializationError(ValueError):
    """A model cannot be saved, or a saved directory does not fit the base model it is loaded onto."""


# --- helpers ------------------------------------------------------------------------------------

def name_list(items: Iterable[str], n: int = SHOW) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def plain_json(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become None, unknown objects their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return str(value)


def split_fqn(fqn: str) -> tuple[str, str]:
    owner, _, name = fqn.rpartition(".")
    return owner, name


def nonpersistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name in mod._non_persistent_buffers_set:
            value = mod._buffers.get(name)
            if value is not None:
                out[f"{prefix}.{name}" if prefix else name] = value
    return out


def config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    try:
        return plain_json(json.loads(config.to_json_string(use_diff=False)))
    except (TypeError, ValueError) as e:
        log.debug("could not record the config of %s: %s", type(model).__name__, e)
        return None


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on ``meta`` (no memory, ties kept)."""
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for _, b in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return copy.deepcopy(model, memo)
