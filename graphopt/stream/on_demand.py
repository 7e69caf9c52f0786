"""A model on ``meta`` whose weights come from the files only while they are used: passes that read the weights
through forwards of the model (``drop_blocks``, ``replace_blocks``: ``Pass.streams_by_forwards``) run on it as
they run in memory, with one block's weights held at a time.

Inside :class:`WeightsOnDemand`:

- the weights outside the blocks are mapped from the files (an embedding lookup reads the rows it needs), and
  the pages they read are let go each time a block starts;
- a block's weights are read when it is called (a forward pre-hook) and freed when it returns; a block left
  loaded by a forward that stopped inside it is freed when the next one loads;
- a linear layer outside the blocks larger than :data:`CHUNK` (an LM head over a tied vocabulary table) computes
  its output a slice of rows at a time, the pages of each slice let go after it, so the table is never resident;
- :meth:`WeightsOnDemand.loaded` gives one module its weights for code that reads them outside a forward (the
  pass reaches it through :meth:`graphopt.infra.program.Program.loaded`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..infra.metrics import give_back_memory
from .checkpoint import Checkpoint, StreamError, free

CHUNK = 64 << 20  # bytes of a linear layer's weight computed at once outside the blocks


def _row_chunked(linear: nn.Linear, checkpoint: Checkpoint) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear``'s forward computed a slice of its output rows at a time, the mapped pages dropped after each."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = linear.weight, linear.bias
        rows = max(1, CHUNK // max(1, w.shape[1] * w.element_size()))
        out = x.new_empty(*x.shape[:-1], w.shape[0])
        for i in range(0, w.shape[0], rows):
            out[..., i:i + rows] = nn.functional.linear(x, w[i:i + rows], None if b is None else b[i:i + rows])
            checkpoint.drop_mapped_pages()
        return out

    return forward


class WeightsOnDemand:
    """``with WeightsOnDemand(model, checkpoint, blocks):`` ``model`` (built on ``meta``) runs as if loaded; the
    blocks named in ``blocks`` hold their weights only while they run. On exit every weight is on ``meta`` again
    but those a pass set meanwhile (new tensors, not read from the files)."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, blocks: list[str]) -> None:
        self.model, self.checkpoint, self.blocks = model, checkpoint, list(blocks)
        #: each module's name in the files, by identity: a pass may renumber the blocks, or run the model with a
        #: shorter list in place (``skipping_differs``), and a module keeps the weights it was saved with
        self.source = {id(m): n for n, m in model.named_modules()}
        self.current: nn.Module | None = None  # the block whose weights are loaded
        self.first = model.get_submodule(self.blocks[0]) if self.blocks else None
        self._block_tensors: list[torch.Tensor] = []
        self._read: list[torch.Tensor] = []  # every tensor outside the blocks given its value (freed on exit)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> WeightsOnDemand:
        self._read += self._load(self.model, skip=tuple(self.blocks), mapped=True)
        for name in self.blocks:
            block = self.model.get_submodule(name)
            hooks = (block.register_forward_pre_hook(lambda m, a: self._enter_block(m)),
                     block.register_forward_hook(lambda m, a, o: self._leave_block()))
            for h in hooks:
                self._stack.callback(h.remove)
        inside = tuple(f"{b}." for b in self.blocks)
        for n, m in self.model.named_modules():  # the module stays what it is; its forward is an instance attribute
            if isinstance(m, nn.Linear) and not n.startswith(inside) and n not in self.blocks \
                    and m.weight.numel() * m.weight.element_size() > CHUNK and "forward" not in vars(m):
                m.forward = _row_chunked(m, self.checkpoint)
                self._stack.callback(vars(m).pop, "forward")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._leave_block()
        for tensor in self._read:
            free(tensor)
        self._read.clear()
        self.checkpoint.drop_mapped_pages()

    def _load(self, module: nn.Module, *, skip: tuple[str, ...] = (), mapped: bool = False) -> list[torch.Tensor]:
        """Read ``module``'s weights that are on ``meta``; returns the tensors given a value."""
        if id(module) not in self.source:
            raise StreamError(f"{type(module).__name__} was built after the weights were mapped to the files, so it "
                              "has no weights there to read")
        before = {id(t) for t in module.state_dict(keep_vars=True).values() if t.is_meta}
        self.checkpoint.load(module, self.source[id(module)], skip=skip, mapped=mapped)
        return [t for t in module.state_dict(keep_vars=True).values() if id(t) in before and not t.is_meta]

    def _enter_block(self, block: nn.Module) -> None:
        if self.current is block:
            return
        self._leave_block()
        if block is self.first:  # a new forward: the last one's outputs may sit in reference cycles (transformers'
            gc.collect()  # outputs do), each an LM's logits over the vocabulary (63 MiB at 128 tokens of Llama 3)
        give_back_memory()  # and the heap the last block's small intermediates fragmented (0.4 GiB over 23 forwards)
        self.checkpoint.drop_mapped_pages()  # what the layers before this block read (embedding rows)
        self._block_tensors = self._load(block)
        self.current = block

    def _leave_block(self) -> None:
        for tensor in self._block_tensors:
            free(tensor)
        self._block_tensors = []
        self.current = None

    @contextlib.contextmanager
    def loaded(self, name: str) -> Iterator[None]:
        """Inside, module ``name`` holds its weights (read from the files; freed on leaving unless a pass replaced
        them)."""
        module = self.model.get_submodule(name)
        if self.current is not None and any(m is module for m in self.current.modules()):
            yield
            return
        tensors = self._load(module)
        try:
            yield
        finally:
            for tensor in tensors:
                free(tensor)
