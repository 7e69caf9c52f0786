"""What a saved model's edit log and weights must satisfy before ``load`` trusts them.

``graphopt.json`` is data a user (or a script, or a disk) can change. Each edit is checked against
the schema of its op before it is replayed, and after replay the model must be self-consistent: the
aliases and non-persistent buffers the manifest names exist, and layer size attributes agree with
their weights (a ``set_attr`` of ``in_features=999`` is caught here, not on the first call). Every
problem is one :class:`SerializationError` naming the first mismatch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..infra.program import LAYOUTS
from ..nn.quant import PackedLayer
from .saved_model import SerializationError

_SCALAR = (bool, int, float, str, type(None))
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


def check_edit(i: int, edit: dict[str, Any]) -> None:
    """Raise if edit ``#i`` of the log does not have the fields and types its op needs."""
    op, target, data = edit.get("op"), edit.get("target"), edit.get("data", {})
    where = f"edit #{i} ({op} {target!r})"
    if op == "set_attr":
        name, value = data.get("name"), data.get("value")
        if not (isinstance(name, str) and name.isidentifier()):
            raise SerializationError(f"{where}: 'name' must be an attribute name, got {name!r}")
        if isinstance(value, list):
            if not all(isinstance(v, _SCALAR) for v in value):
                raise SerializationError(f"{where}: {name} = {value!r}: list values must hold plain numbers/strings")
        elif not isinstance(value, _SCALAR):
            raise SerializationError(f"{where}: {name} = {value!r} is not a plain value")
        if isinstance(value, float) and not math.isfinite(value):
            raise SerializationError(f"{where}: {name} = {value!r} is not finite")
    elif op == "set_tensor" and not data.get("remove"):
        shape, dtype = data.get("shape"), data.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in shape)):
            raise SerializationError(f"{where}: 'shape' must be a list of sizes >= 0, got {shape!r}")
        if dtype not in _DTYPES:
            raise SerializationError(f"{where}: unknown dtype {dtype!r}")
        for flag in ("buffer", "persistent", "requires_grad"):
            if flag in data and not isinstance(data[flag], bool):
                raise SerializationError(f"{where}: {flag!r} must be true or false, got {data[flag]!r}")
    elif op == "set_layout" and data.get("memory_format") not in LAYOUTS:
        raise SerializationError(f"{where}: 'memory_format' must be one of {', '.join(LAYOUTS)}, got "
                                 f"{data.get('memory_format')!r}")
    elif op == "tie" and not isinstance(data.get("to"), str):
        raise SerializationError(f"{where}: 'to' must name the tensor it is tied to, got {data.get('to')!r}")
    elif op == "remove_items" and not (isinstance(data.get("indices"), list) and data["indices"] and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in data["indices"])):
        raise SerializationError(f"{where}: 'indices' must be a list of item numbers >= 0, got {data.get('indices')!r}")
    elif op == "set_config" and not isinstance(data.get("key"), str):
        raise SerializationError(f"{where}: 'key' must be a config field name, got {data.get('key')!r}")


def check_attr_types(model: nn.Module, i: int, edit: dict[str, Any]) -> None:
    """A ``set_attr`` must keep the kind of value the attribute holds (a size stays an int)."""
    if edit.get("op") != "set_attr":
        return
    data, target = edit["data"], edit.get("target", "")
    try:
        owner = model.get_submodule(target) if target else model
    except AttributeError:
        return  # replay names the missing module
    if not hasattr(owner, data["name"]):
        return
    current, value = getattr(owner, data["name"]), data["value"]
    kinds = {bool: "a bool", int: "an int", float: "a float", str: "a str", list: "a list", tuple: "a list"}
    had, got = kinds.get(type(current)), kinds.get(type(value))
    if had and got and had != got and not (had == "a float" and got == "an int"):
        raise SerializationError(f"edit #{i} (set_attr {target!r}): {data['name']} holds {had} "
                                 f"({current!r}) but the log sets {got} ({value!r})")


def layer_size_problems(model: nn.Module) -> list[str]:
    """Layers whose size attributes disagree with their weights (what replaying a bad log leaves), and
    quantized layers whose packed codes or scales no quantizer writes (a tampered or corrupt file)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, PackedLayer):
            out += [f"{name or '<root>'}: {problem}" for problem in m.value_problems()]
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        expected: dict[str, Any] = {}
        if isinstance(m, nn.Linear):
            expected = {"in_features": w.shape[1], "out_features": w.shape[0]}
        elif isinstance(m, nn.Embedding):
            expected = {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
        elif isinstance(m, nn.modules.conv._ConvNd):
            a, b = (w.shape[0], w.shape[1] * m.groups)
            expected = {"in_channels": a, "out_channels": b} if m.transposed else {"out_channels": a,
                                                                                    "in_channels": b}
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            expected = {"num_features": w.shape[0]}
        elif isinstance(m, nn.LayerNorm):
            expected = {"normalized_shape": tuple(w.shape)}
        for attr, size in expected.items():
            if getattr(m, attr, size) != size:
                out.append(f"{name or '<root>'}.{attr} = {getattr(m, attr)!r} but its weight is {list(w.shape)}")
    return out
