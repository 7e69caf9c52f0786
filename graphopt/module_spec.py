"""Describe modules as JSON (class path + constructor kwargs) so edits replay without pickle.

A module that a pass swaps into a model must be rebuildable by :func:`graphopt.load`. Torch's
common layers are described from their attributes; graphopt's own modules and user modules
provide a spec by registering a function with :func:`register_module_spec` or by defining
``graphopt_spec(self) -> dict`` (constructor kwargs). Only classes from ``torch.nn``,
``graphopt`` or classes registered here are ever rebuilt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SpecFn = Callable[[nn.Module], dict[str, Any]]

_SPEC_FNS: dict[type, SpecFn] = {}
_ALLOWED_CLASSES: dict[str, type] = {}
_ALLOWED_PREFIXES = ("torch.nn.", "graphopt.")


class ModuleSpecError(TypeError):
    """A module cannot be described as JSON or rebuilt from its description."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module_spec(cls: type, fn: SpecFn | None = None):
    """Register how to describe ``cls`` instances as constructor kwargs (usable as a decorator)."""

    def deco(f: SpecFn) -> SpecFn:
        _SPEC_FNS[cls] = f
        _ALLOWED_CLASSES[class_path(cls)] = cls
        return f

    return deco(fn) if fn is not None else deco


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_meta(module: nn.Module) -> dict[str, Any]:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not tensors:
        return {}
    return {"dtype": _dtype_name(tensors[0].dtype)}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """Return ``{"class": path, "kwargs": {...}}`` for a module, or raise :class:`ModuleSpecError`."""
    cls = type(module)
    fn = _SPEC_FNS.get(cls)
    if fn is None and hasattr(module, "graphopt_spec"):
        fn = type(module).graphopt_spec  # type: ignore[attr-defined]
        _ALLOWED_CLASSES.setdefault(class_path(cls), cls)
    if fn is None:
        raise ModuleSpecError(
            f"cannot describe a {class_path(cls)} as JSON; define graphopt_spec(self) -> constructor kwargs "
            f"on the class or call graphopt.register_module_spec({cls.__name__}, fn)"
        )
    return {"class": class_path(cls), "kwargs": fn(module), **_tensor_meta(module)}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a module from :func:`module_spec` output (parameters uninitialised values; shapes right)."""
    path = spec["class"]
    cls = _ALLOWED_CLASSES.get(path)
    if cls is None:
        if not path.startswith(_ALLOWED_PREFIXES):
            raise ModuleSpecError(
                f"refusing to build {path}: only torch.nn, graphopt and registered classes are rebuilt; "
                f"import the module that registers it before loading"
            )
        mod_name, _, qual = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name), qual)
        except (ImportError, AttributeError) as e:
            raise ModuleSpecError(f"cannot import {path}: {e}") from e
    kwargs = dict(spec.get("kwargs", {}))
    module = cls(**kwargs)
    if "dtype" in spec:
        module = module.to(getattr(torch, spec["dtype"]))
    return module


# --- torch.nn built-ins -------------------------------------------------------------------------

for _cls in (nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid):
    register_module_spec(_cls, lambda m: {})


@register_module_spec(nn.Linear)
def _linear_spec(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _conv_spec(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
        "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module_spec(_cls, _conv_spec)


@register_module_spec(nn.LayerNorm)
def _layernorm_spec(m: nn.LayerNorm) -> dict[str, Any]:
    return {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
            "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None}


@register_module_spec(nn.Embedding)
def _embedding_spec(m: nn.Embedding) -> dict[str, Any]:
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx}


def _bn_spec(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_module_spec(_cls, _bn_spec)


@register_module_spec(nn.Dropout)
def _dropout_spec(m: nn.Dropout) -> dict[str, Any]:
    return {"p": m.p}
