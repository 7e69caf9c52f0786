"""Cut a span of blocks out of a model through the Program, keeping it the model it was.

After the blocks are removed (or replaced by one module), the rest are renumbered; attributes that
hold a block's position (``layer_idx``: which KV-cache slot a decoder layer writes) follow; and a
HuggingFace config's layer count and per-layer lists (``layer_types``) follow too, chosen by building
the model from the changed config on ``meta`` and comparing (no table of config names), so that
``save_pretrained`` + plain ``from_pretrained`` rebuild a model whose blocks were dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from graphopt.analysis.blocks import BlockList, hidden_of, with_first
from graphopt.analysis.hf_config import fit_config, is_hf_model, structure_mismatches, summarize
from graphopt.frontend.inputs import as_example_inputs, flatten_outputs
from graphopt.frontend.kv_cache import caches_off
from graphopt.infra.contract import PassResult
from graphopt.infra.program import Program, swapped_modules

log = logging.getLogger(__name__)

#: attributes that hold a block's position in the stack
LAYER_INDEX_ATTRS = ("layer_idx", "layer_index", "layer_id", "layer_number")


def cut_span(program: Program, blocks: BlockList, start: int, n: int, replacement: nn.Module | None,
             result: PassResult) -> None:
    """Remove blocks ``start .. start+n-1`` (``replacement`` takes the place of the first) and renumber."""
    old_len = len(blocks)
    removed = list(range(start, start + n))
    if replacement is not None:
        program.replace_module(blocks.names[start], replacement)
        removed = removed[1:]
    if removed:
        program.remove_items(blocks.path, removed)
    old_of = [i for i in range(old_len) if i not in set(removed)]
    _renumber(program, blocks.path, old_of)
    slot = f"{blocks.path}.{start}" if replacement is not None else None
    _sync_config(program, old_len, removed, slot, result)


def _renumber(program: Program, path: str, old_of: list[int]) -> None:
    items = program.get_submodule(path)
    for new, old in enumerate(old_of):
        if new == old:
            continue
        prefix = f"{path}.{new}"
        for name, module in items[new].named_modules():
            for attr in LAYER_INDEX_ATTRS:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == old:
                    program.set_attr(f"{prefix}.{name}" if name else prefix, attr, new)


def _count_keys(config: object, old_len: int) -> list[str]:
    return [k for k, v in vars(config).items()
            if isinstance(v, int) and not isinstance(v, bool) and v == old_len and not k.startswith("_")]


def _list_keys(config: object, old_len: int) -> list[str]:
    return [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == old_len and not k.startswith("_")]


def _sync_config(program: Program, old_len: int, removed: list[int], slot: str | None, result: PassResult) -> None:
    """Set the config field that holds the layer count and shorten the per-layer lists: the change that
    describes the model best, found by the one config search (:func:`fit_config`, seeded with each field
    that holds ``old_len``)."""
    model = program.module
    if not is_hf_model(model) or not removed:
        return
    config = model.config
    new_len = old_len - len(removed)
    lists = {k: [v for i, v in enumerate(getattr(config, k)) if i not in set(removed)]
             for k in _list_keys(config, old_len)}
    seeds = [{key: new_len, **lists} for key in _count_keys(config, old_len)]
    fit = fit_config(model, seeds=seeds, search=False) if seeds else None
    key = next((k for k in _count_keys(config, old_len) if fit is not None and fit.changes.get(k) == new_len), None)
    if key is None:
        result.note("<config>", f"no config field holds the layer count {old_len}; the config was not updated "
                    "(save with go.save / go.load)", "warning")
        return
    for k, v in fit.changes.items():
        program.set_config(k, v)
    changed = ", ".join([f"{key}={new_len}", *(f"{k} (item {', '.join(map(str, removed))} removed)" for k in lists)])
    problems = structure_mismatches(model, attributes=True)
    if problems:
        result.note("<config>", f"config updated ({changed}) but it cannot describe the rewritten model "
                    f"({summarize(problems, 1)}): save with go.save / go.load", "info")
    else:
        result.note("<config>", f"config updated so that save_pretrained + from_pretrained rebuild the model: "
                    f"{changed}", "info")


def skipping_differs(model: nn.Module, blocks: BlockList, start: int, n: int, example: Any) -> str:
    """``""`` when removing blocks ``start .. start+n-1`` from their list computes what the model computes with
    those blocks skipped (each returning its input); else why not. A reader that picks blocks by position
    (a head keyed by block index, ``out_indices``, the last block's output read apart from the stack's)
    would read another block after the list shrinks, which no data-flow probe of the boundaries can see."""
    modules = [model.get_submodule(name) for name in blocks.names]
    span = modules[start:start + n]
    inputs = as_example_inputs(example)
    entering: dict[int, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        entering[id(module)] = hidden_of(args, kwargs)[0]

    def give_input(module: nn.Module, args: tuple, out: Any) -> Any:
        return with_first(out, entering[id(module)])

    def floats(out: Any) -> list[torch.Tensor]:
        return [v for v in flatten_outputs(out).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]

    handles = [h for b in span for h in (b.register_forward_pre_hook(keep_input, with_kwargs=True),
                                         b.register_forward_hook(give_input))]
    try:
        with torch.no_grad(), caches_off(model):  # (a KV cache indexes layers by their old numbers)
            skipped = floats(inputs.call(model))
    finally:
        for h in handles:
            h.remove()
    shorter = nn.ModuleList([m for i, m in enumerate(modules) if not start <= i < start + n])
    with swapped_modules(model, {blocks.path: shorter}), torch.no_grad(), caches_off(model):
        removed = floats(inputs.call(model))
    if len(removed) == len(skipped) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                                            for a, b in zip(removed, skipped)):
        return ""
    return (f"removing {blocks.names[start]}{'' if n == 1 else f' .. {blocks.names[start + n - 1]}'} from "
            f"{blocks.path} is not the same as skipping it: something reads the blocks by position (a head keyed "
            "by block index, out_indices, the last block's output apart from the stack's)")
