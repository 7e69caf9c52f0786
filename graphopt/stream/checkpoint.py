"""The weights of a model that stay on disk: an HF folder of safetensors files, read one module at a time.

A streamed run (:mod:`graphopt.stream`) builds the model with its parameters on the ``meta`` device
(:func:`meta_skeleton`: no memory, buffers real) and gives a module its weights only while a pass works on it
(:meth:`Checkpoint.load`), then takes them back (:func:`offload`). Tensors are swapped in place
(``torch.utils.swap_tensors``), so weights tied between modules (an LM head and its embedding table) stay one
parameter whichever module loads them.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .parts import read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class StreamError(ValueError):
    """A model that cannot be streamed from disk, or a pass that cannot run on one block at a time."""


class Checkpoint:
    """The tensors of an HF folder (``model.safetensors`` or shards with ``model.safetensors.index.json``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreamError(f"{self.folder} is not a folder; stream a model saved with save_pretrained "
                              "(config.json and safetensors files)")
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise StreamError(f"{self.folder} holds no {SINGLE_FILE} nor {INDEX_FILE}; save the model with "
                              "save_pretrained(safe_serialization=True)")
        self.files = {name: self.folder / file for name, file in weight_map.items()}
        self.mapped: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # the mappings tensors still read

    def drop_mapped_pages(self) -> None:
        """Let go of the pages the mapped tensors have read so far (they are read again from the file if touched):
        the kernel maps large blocks of a file around each page read (2 MiB folios), so 16 x 128 token lookups in a
        mapped 1 GiB embedding table held 0.9 GiB of it resident."""
        for view in list(self.mapped):
            if hasattr(view, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                view.madvise(mmap.MADV_DONTNEED)

    def config(self) -> Any:
        """The folder's transformers config."""
        from transformers import AutoConfig

        if not (self.folder / "config.json").is_file():
            raise StreamError(f"{self.folder} has no config.json: stream an HF folder (save_pretrained), or build "
                              "the model on meta yourself and pass it as model=")
        return AutoConfig.from_pretrained(self.folder)

    def read(self, name: str, *, mapped: bool = False) -> torch.Tensor:
        """One tensor, read from its file into memory; ``mapped``: mapped from the file instead, its pages read
        only where touched (an embedding table that a few tokens look up) and private to this process."""
        if name not in self.files:
            raise StreamError(f"{self.folder} holds no tensor {name!r} (the model expects it; was the folder "
                              "saved from another architecture?)")
        if not mapped:
            with safe_open(str(self.files[name]), framework="pt") as f:
                return f.get_tensor(name)
        header, data_start = read_header(self.files[name])
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        with self.files[name].open("rb") as f:
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.mapped.add(view)
        flat = torch.frombuffer(view, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin)
        return flat.reshape(info["shape"])

    def load(self, module: nn.Module, prefix: str, *, skip: tuple[str, ...] = (), mapped: bool = False) -> None:
        """Give ``module`` (named ``prefix`` in the model) its weights and persistent buffers from the files;
        tensors under the submodule names in ``skip`` (relative to ``module``) stay where they are."""
        for local, tensor in _own_tensors(module):
            if local.startswith(tuple(f"{s}." for s in skip)) or not tensor.is_meta:
                continue
            value = self.read(f"{prefix}.{local}" if prefix else local, mapped=mapped)
            if value.shape != tensor.shape:
                raise StreamError(f"{prefix}.{local} is {list(value.shape)} in {self.folder} but "
                                  f"{list(tensor.shape)} in the model built from its config")
            _swap(tensor, value)


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of ``module`` and its children, each once (tied ones once)."""
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def _swap(tensor: torch.Tensor, value: torch.Tensor) -> None:
    new = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
    torch.utils.swap_tensors(tensor, new)


def offload(module: nn.Module, *, skip: tuple[str, ...] = ()) -> None:
    """Take ``module``'s weights and persistent buffers back to ``meta`` (their memory is freed), but those under
    ``skip``; non-persistent buffers (rotary tables) are computed at construction and stay."""
    for local, tensor in _own_tensors(module):
        if not local.startswith(tuple(f"{s}." for s in skip)):
            free(tensor)


def free(tensor: torch.Tensor) -> None:
    """Swap one tensor to ``meta`` in place (its memory freed; every module holding it sees the change)."""
    if not tensor.is_meta:
        _swap(tensor, torch.empty_like(tensor, device="meta"))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta``; buffers (rotary tables) are computed for real."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_skeleton(config: Any) -> nn.Module:
    """The transformers model of ``config`` (its ``architectures[0]``), parameters on ``meta``, in eval mode."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise StreamError(f"the config names no transformers class ({names or 'no architectures'}); build the "
                          "model on meta yourself and pass it as model=")
    with _parameters_on_meta():
        model = cls._from_config(config)
    return model.eval()
