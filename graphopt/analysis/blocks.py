"""A model's repeated blocks, found structurally, and how to run them on recorded inputs.

The *blocks* of a model are the children of an ``nn.ModuleList`` whose members are all of one class
and run one after the other on each other's outputs (the residual stream of a transformer: BERT's
``encoder.layer``, Llama's ``layers``, GPT-2's ``h``, T5's ``block``). No table of model names: the
structure and one call of the model decide. Depth rewrites (``drop_blocks``, ``replace_blocks``) cut
spans of them; GPTQ quantizes one at a time.

A block whose parameters differ from the others' (T5's first block holds the relative position
bias that every later block reuses) is *special*: depth rewrites never cut it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import as_example_inputs, flatten_outputs
from ..nn.depth import LinearBlock
from .hooked import Stop, run_hooked
from .manager import AnalysisManager, Analyzable, register_analysis

log = logging.getLogger(__name__)

Replace = Callable[[torch.Tensor], tuple[tuple, dict]]


@dataclass
class BlockList:
    """The repeated blocks of a model: the ``ModuleList`` at ``path`` and its children's names."""

    path: str
    names: list[str]
    special: dict[int, str] = field(default_factory=dict)  # index -> why it is never cut

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class BlockCursor:
    """Where a run streamed from disk is (:mod:`graphopt.stream`): the one block whose weights are loaded and
    the inputs it takes, an ``(args, kwargs)`` per calibration batch. A pass that runs the block on them
    (GPTQ by block) leaves the inputs of the next block in ``next_inputs``."""

    name: str
    inputs: list[tuple[tuple, dict]]
    next_inputs: list[tuple[tuple, dict]] | None = None


def hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Replace]:
    """The hidden states a block takes (first positional arg, or ``hidden_states=``) and how to replace them."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda h: ((h, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], lambda h: (args, {**kwargs, "hidden_states": h})
    raise TypeError("the block takes no hidden-states tensor")


def next_inputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The inputs of the block after ``block``: each of ``inputs`` with its hidden states replaced by
    ``block``'s output on it (the other arguments, masks and positions, are shared by every block)."""
    with torch.no_grad():
        outputs = [block(*args, **kwargs) for args, kwargs in inputs]
    return [hidden_of(*io)[1](first_tensor(out)) for io, out in zip(inputs, outputs)]


def first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if it is a tensor, else the first element of a tuple/list (a block's hidden output)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    return None


def first_block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` gets for each batch; each forward stops there."""
    seen: list[tuple[tuple, dict]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, dict(kwargs)))
        raise Stop

    run_hooked(model, batches, [block.register_forward_pre_hook(record, with_kwargs=True)])
    return seen


def chained(model: nn.Module, blocks: list[nn.Module], batch: Any, *, to_end: bool = True) -> bool:
    """Whether the blocks run once each in list order, each block's hidden-states input the previous block's
    output (on one batch). Blocks run in another order (reversed) are not a stack the list describes.
    ``to_end=False`` stops the forward after the last block (a streamed model's LM head is not read)."""
    seen_in: list[torch.Tensor] = []
    seen_out: list[torch.Tensor] = []
    order: list[int] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        order.append(id(module))
        with contextlib.suppress(TypeError):
            seen_in.append(hidden_of(args, kwargs)[0])

    def post(module: nn.Module, args: tuple, out: Any) -> None:
        seen_out.append(first_tensor(out))
        if not to_end and module is blocks[-1]:
            raise Stop

    run_hooked(model, [batch], [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                                             b.register_forward_hook(post))])
    return order == [id(b) for b in blocks] and len(seen_in) == len(seen_out) == len(blocks) and all(
        isinstance(o, torch.Tensor) and o.shape == i.shape and torch.equal(o, i)
        for o, i in zip(seen_out[:-1], seen_in[1:]))


def with_first(value: Any, new: torch.Tensor) -> Any:
    """``value`` (a block's output: a tensor or a tuple starting with one) with its first tensor ``new``."""
    if isinstance(value, torch.Tensor):
        return new
    return type(value)([with_first(value[0], new), *value[1:]]) if isinstance(value, list) else \
        (with_first(value[0], new), *value[1:])


def read_elsewhere(model: nn.Module, blocks: BlockList, example: Any) -> dict[int, str]:
    """Block boundaries whose hidden states something besides the next block reads (a side head on block 1's
    output, a feature pyramid), as ``{i: why}`` for block ``i``'s output. A depth cut may remove the blocks
    on either side of such a boundary only if nothing else reads it: the other reader would see what the
    cut computes instead.

    Found from the data flow, not from values: for each boundary, the model runs with block ``i``'s output
    shifted by a large random offset while block ``i + 1`` is handed the clean output. If the model's outputs
    move, another reader saw the offset.
    """
    modules = [model.get_submodule(n) for n in blocks.names]
    inputs = as_example_inputs(example)

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            flat = flatten_outputs(inputs.call(model))
        kept = [t for t in flat.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        del flat
        gc.collect()  # transformers' output objects sit in reference cycles: a 1B Llama's logits each, until collected
        return kept

    base = outputs()
    found: dict[int, str] = {}
    for i in range(len(modules) - 1):
        with _shifted_between(modules[i], modules[i + 1], seed=i):
            probed = outputs()
        moved = [j for j, (a, b) in enumerate(zip(probed, base)) if not torch.equal(a, b)]
        if moved:
            found[i] = (f"the output of {blocks.names[i]} is read by more than {blocks.names[i + 1]} (output {moved[0]} "
                        "of the model depends on it another way: a side head or a skip connection)")
    return found


@contextlib.contextmanager
def _shifted_between(block: nn.Module, successor: nn.Module, seed: int) -> Iterator[None]:
    """Inside: ``block``'s output is shifted by a large random offset, but ``successor`` gets it unshifted."""
    clean: list[torch.Tensor] = []

    def shift(module: nn.Module, args: tuple, out: Any) -> Any:
        h = first_tensor(out)
        clean.append(h)
        noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return with_first(out, h + (noise.to(h) + 1.0) * (h.detach().abs().max() + 1.0))

    def restore(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return hidden_of(args, kwargs)[1](clean[-1])

    handles = [block.register_forward_hook(shift), successor.register_forward_pre_hook(restore, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def same_class_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of two or more blocks of one class (LinearBlocks of an earlier replace_blocks aside)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 1 and name
            and len({type(c) for c in m if not isinstance(c, LinearBlock)}) == 1]


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _special_blocks(blocks: nn.ModuleList) -> dict[int, str]:
    """Blocks whose parameter names differ from the most common set, with the names that differ."""
    names = [frozenset(n for n, _ in b.named_parameters()) for b in blocks]
    common, _ = Counter(n for n, b in zip(names, blocks) if not isinstance(b, LinearBlock)).most_common(1)[0]
    out = {}
    for i, own in enumerate(names):
        if isinstance(blocks[i], LinearBlock):
            out[i] = f"block {i} is the linear map of an earlier replace_blocks; it is never cut"
        elif own != common:
            extra = sorted(own - common) or sorted(common - own)
            out[i] = (f"block {i} has parameters the others {'lack' if own - common else 'have'} "
                      f"({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''}); it is never cut")
    return out


def all_blocks(model: nn.Module, example: Any, *, to_end: bool = True) -> list[BlockList]:
    """Every stack of repeated blocks of ``model``, the one holding the most parameters first: an
    encoder-decoder has two (T5's ``encoder.block`` and ``decoder.block``). A list nested inside an earlier
    one's blocks is not a stack of its own. ``[]`` when there is none."""
    found: list[BlockList] = []
    for name, blocks in sorted(same_class_lists(model), key=lambda nm: -_param_count(nm[1])):
        if _param_count(blocks) == 0 or any(name.startswith(f"{b}.") for f in found for b in f.names):
            continue
        if chained(model, list(blocks), example, to_end=to_end):
            found.append(BlockList(name, [f"{name}.{i}" for i in range(len(blocks))], _special_blocks(blocks)))
    return found


def block_of(name: str, stacks: list[BlockList]) -> str | None:
    """The block (``"encoder.block.1"``) that module ``name`` sits in, or None."""
    return next((b for s in stacks for b in s.names if name == b or name.startswith(f"{b}.")), None)


def find_blocks(model: nn.Module, example: Any, path: str | None = None, *, to_end: bool = True) -> BlockList:
    """The repeated blocks of ``model``: the same-class ``ModuleList`` holding the most parameters whose
    members run one after the other on ``example`` (or the list at ``path``). The one finder of blocks:
    depth rewrites, GPTQ, SmoothQuant, heal and dyt all use it (or the ``"blocks"`` analysis, its cached
    form on a Program's model).

    Raises ``ValueError`` naming what was found when there is none.
    """
    lists = same_class_lists(model)
    if path is not None:
        found = dict(lists)
        if path not in found:
            raise ValueError(f"{path!r} is not a ModuleList of two or more blocks of one class in "
                             f"{type(model).__name__}; lists that are: {sorted(found) or 'none'}")
        if chained(model, list(found[path]), example, to_end=to_end):
            blocks = found[path]
            return BlockList(path, [f"{path}.{i}" for i in range(len(blocks))], _special_blocks(blocks))
        lists, stacks = [(path, found[path])], []
    else:
        stacks = all_blocks(model, example, to_end=to_end)
    if stacks:
        return stacks[0]
    tried = [name for name, blocks in lists if _param_count(blocks)]
    if tried:
        raise ValueError(f"{type(model).__name__} has no repeated blocks on its residual path: the members of "
                         f"{', '.join(tried)} do not run one after the other, in list order, on each other's outputs")
    raise ValueError(f"{type(model).__name__} has no repeated blocks (no ModuleList of two or more blocks of one "
                     "class with parameters); depth rewrites need a stack of layers")


@register_analysis("blocks")
def _blocks(program: Analyzable, am: AnalysisManager) -> list[BlockList]:
    """Every stack of repeated blocks of the Program's model (:func:`all_blocks`), found on its example inputs."""
    return all_blocks(program.module, program.example_inputs)
