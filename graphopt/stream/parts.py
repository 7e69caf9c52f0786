"""Weights written part by part while a streamed run goes, then joined into one safetensors file.

Each block's tensors are written as soon as its passes are done (``part-00003.safetensors`` in a scratch
folder), so no more than one block is ever held; tensors no pass changed are copied from the source files
as they are; :meth:`Parts.join` then writes the file ``graphopt.load`` reads, copying bytes in chunks (memory
stays at one chunk). The safetensors layout: 8 bytes of
header length (little-endian), the JSON header (each tensor's dtype, shape and byte range in the data that
follows, and ``__metadata__``), padded with spaces to a multiple of 8, then the data.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

CHUNK = 64 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (its tensors) and the offset where its data starts."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class Parts:
    """Parts written in ``folder`` (created; removed by :meth:`discard` once joined), and tensors to copy as they are
    from other safetensors files (:meth:`copy`: a model's unchanged embedding table never enters memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.entries: dict[str, tuple[dict, Path, int]] = {}  # name -> (header entry, file, where its data starts)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write one part (contiguous CPU tensors, names not written before)."""
        path = self.folder / f"part-{self.written:05d}.safetensors"
        self._check_new(tensors.keys())
        save_file(tensors, str(path))
        self.written += 1
        self._add(path, set(tensors))

    def copy(self, files: dict[str, Path]) -> None:
        """Take the tensors named in ``files`` from those safetensors files, byte for byte, when joining."""
        self._check_new(files.keys())
        by_file: dict[Path, set[str]] = {}
        for name, path in files.items():
            by_file.setdefault(path, set()).add(name)
        for path, names in by_file.items():
            self._add(path, names)

    def _check_new(self, names: Iterable[str]) -> None:
        again = sorted(set(names) & self.entries.keys())
        if again:
            raise ValueError(f"tensors written twice: {again[:3]}")

    def _add(self, path: Path, names: set[str]) -> None:
        header, data_start = read_header(path)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] in names else -1):
            if name in names:
                self.entries[name] = (info, path, data_start)

    def join(self, path: Path, metadata: dict[str, str]) -> None:
        """Write every tensor into one safetensors file at ``path``, in the order given, copying in chunks."""
        header: dict[str, dict] = {}
        offset = 0
        for name, (info, _, _) in self.entries.items():
            begin, end = info["data_offsets"]
            header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for info, source, data_start in self.entries.values():
                begin, end = info["data_offsets"]
                with source.open("rb") as f:
                    f.seek(data_start + begin)
                    size = end - begin
                    while size:
                        chunk = f.read(min(CHUNK, size))
                        if not chunk:
                            raise OSError(f"{source} ends before its tensors do")
                        out.write(chunk)
                        size -= len(chunk)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
