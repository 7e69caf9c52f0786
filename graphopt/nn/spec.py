"""Describe modules as JSON (class path + constructor kwargs) so edits replay without pickle.

A module that a pass swaps into a model must be rebuildable by :func:`graphopt.load`. Torch's
common layers are described from their attributes; graphopt's own modules and user modules
provide a spec by registering a function with :func:`register_module_spec` or by defining
``graphopt_spec(self) -> dict`` (constructor kwargs). Only classes from ``torch.nn``,
``graphopt`` or classes registered here are ever rebuilt.
"""

from __future__ import annotations

import importlib
import sys
from collections import OrderedDict
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
    # Module.to(dtype) only casts floating-point tensors, so only a floating dtype is worth recording.
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    for t in tensors:
        if t.is_floating_point():
            return {"dtype": _dtype_name(t.dtype)}
    return {}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _container_spec(module: nn.Module) -> dict[str, Any]:
    children = []
    for name, child in module.named_children():
        try:
            children.append([name, module_spec(child)])
        except ModuleSpecError as e:
            raise ModuleSpecError(f"child {name!r} of {type(module).__name__}: {e}") from None
    return {"class": class_path(type(module)), "children": children}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """Return ``{"class": path, "kwargs": {...}}`` for a module, or raise :class:`ModuleSpecError`.

    ``nn.Sequential``/``ModuleList``/``ModuleDict`` are described by their children's specs.
    """
    cls = type(module)
    if cls in _CONTAINERS:
        return _container_spec(module)
    fn = _SPEC_FNS.get(cls)
    if fn is None and hasattr(module, "graphopt_spec"):
        fn = type(module).graphopt_spec  # type: ignore[attr-defined]
        _ALLOWED_CLASSES.setdefault(class_path(cls), cls)
    if fn is None:
        raise ModuleSpecError(
            f"cannot describe a {class_path(cls)} as JSON; define graphopt_spec(self) -> constructor kwargs "
            f"on the class or call graphopt.register_module_spec({cls.__name__}, fn)"
        )
    version = getattr(cls, "graphopt_spec_version", None)
    return {"class": class_path(cls), "kwargs": fn(module), **_tensor_meta(module),
            **({"version": version} if version is not None else {})}


def _checked_kwargs(cls: type, spec: dict[str, Any]) -> dict[str, Any]:
    """The constructor kwargs of ``spec``, for the spec format version ``cls`` reads.

    A class of graphopt's own declares ``graphopt_spec_version`` (its kwargs' layout); a spec written before
    versions existed is version 1. A newer version is refused (upgrade graphopt); an older one is migrated
    by ``cls.graphopt_spec_upgrade(kwargs, version)`` where the class has it, else refused by name.
    """
    kwargs = dict(spec.get("kwargs", {}))
    current = getattr(cls, "graphopt_spec_version", None)
    if current is None:
        return kwargs
    saved = spec.get("version", 1)
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        raise ModuleSpecError(f"the spec of {spec['class']} has version {saved!r}; versions are integers from 1")
    if saved > current:
        raise ModuleSpecError(f"{spec['class']} was saved in its spec version {saved}, newer than the {current} "
                              "this graphopt reads: upgrade graphopt to load it")
    if saved < current:
        upgrade = getattr(cls, "graphopt_spec_upgrade", None)
        if upgrade is None:
            raise ModuleSpecError(f"{spec['class']} was saved in its spec version {saved}, which this graphopt "
                                  f"(version {current}) cannot read: load it with the graphopt that saved it and "
                                  "save it again, or optimize the original model again")
        kwargs = upgrade(kwargs, saved)
    return kwargs


#: Classes of graphopt that moved, by their old paths (files saved before the move name those).
_MOVED = {"graphopt.norms.DyT": "graphopt.nn.dyt.DyT", "graphopt.norms.ELN": "graphopt.nn.dyt.ELN"}


def _resolve_class(path: str) -> type:
    path = _MOVED.get(path, path)
    cls = _ALLOWED_CLASSES.get(path)
    mod_name, _, qual = path.rpartition(".")
    if cls is None and mod_name in sys.modules:
        # A class that opted in through graphopt_spec, from a module the caller has already imported.
        found = getattr(sys.modules[mod_name], qual, None)
        if isinstance(found, type) and hasattr(found, "graphopt_spec"):
            cls = found
    if cls is None:
        if not path.startswith(_ALLOWED_PREFIXES):
            raise ModuleSpecError(
                f"refusing to build {path}: only torch.nn, graphopt and registered classes are rebuilt; "
                f"import the module that defines it (with graphopt_spec or register_module_spec) before loading"
            )
        try:
            cls = getattr(importlib.import_module(mod_name), qual)
        except (ImportError, AttributeError) as e:
            raise ModuleSpecError(f"cannot import {path}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModuleSpecError(f"refusing to build {path}: it is not an nn.Module class")
    return cls


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a module from :func:`module_spec` output (parameters uninitialised values; shapes right)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise ModuleSpecError(f"a module spec is a dict with a 'class' path, got {spec!r}")
    cls = _resolve_class(spec["class"])
    if "children" in spec:
        children = [(name, build_module(child)) for name, child in spec["children"]]
        if issubclass(cls, nn.ModuleList):
            return cls([m for _, m in children])
        return cls(OrderedDict(children))
    kwargs = _checked_kwargs(cls, spec)
    try:
        module = cls(**kwargs)
    except TypeError as e:
        raise ModuleSpecError(f"cannot build {spec['class']} from kwargs {kwargs}: {e}") from e
    if "dtype" in spec:
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ModuleSpecError(f"unknown dtype {spec['dtype']!r} in the spec of {spec['class']}")
        module = module.to(dtype)
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
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx,
            "max_norm": m.max_norm, "norm_type": m.norm_type, "scale_grad_by_freq": m.scale_grad_by_freq,
            "sparse": m.sparse}


def _bn_spec(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_module_spec(_cls, _bn_spec)


@register_module_spec(nn.Dropout)
def _dropout_spec(m: nn.Dropout) -> dict[str, Any]:
    return {"p": m.p}
