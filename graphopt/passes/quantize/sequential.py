"""A sequential quantize algorithm (GPTQ) one transformer block at a time (the order of the GPTQ paper's
reference implementation).

The model runs once, up to its first block, to record that block's inputs for every calibration
batch. Then, block by block: the layers of the block are quantized group by group (layers that read
the same tensor together) on the algorithm's statistic of their inputs (GPTQ: Gram matrices) computed by
running *only that block* on the recorded inputs, and the quantized block's outputs become the next block's inputs. Each layer thus
sees the activations of the already-quantized model, as in the whole-model sequential order, but the
work is one pass over the blocks instead of one forward per group, and only one block's inputs are
held at a time (the step towards streaming a model larger than memory block by block).

Blocks are the model's main stack (:func:`graphopt.analysis.blocks.find_blocks`, the finder every pass
uses); layers outside it (a pooler, an LM head, an encoder-decoder's other stack) are left to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from graphopt.analysis.blocks import BlockCursor, find_blocks, first_block_inputs, hidden_of, next_inputs
from graphopt.analysis.calibration import layer_input_stats, mask_of
from graphopt.analysis.hooked import call_order
from graphopt.frontend.inputs import ExampleInputs
from graphopt.infra.metrics import give_back_memory
from graphopt.progress import track

log = logging.getLogger(__name__)

QuantizeGroup = Callable[[list[str], dict[str, Any]], None]


def sequential_by_block(model: nn.Module, targets: list[str], batches: list, statistic: Callable[[int], Any],
                        quantize_group: QuantizeGroup, at: BlockCursor | None = None) -> list[str]:
    """Quantize the targets inside the model's blocks, block by block; returns the targets left (outside).

    Returns every target untouched when the model has no recognisable blocks (the caller then runs
    the whole-model sequential order). ``at``: a run streamed from disk, where only that block is loaded
    and its inputs were recorded; its ``next_inputs`` are set to the next block's.
    """
    if at is not None:
        blocks, inputs = [at.name], at.inputs
    else:
        try:
            blocks = find_blocks(model, batches[0]).names
        except ValueError as e:
            log.info("GPTQ in whole-model order: %s", e)
            return targets
        inputs = first_block_inputs(model, model.get_submodule(blocks[0]), batches)
    try:
        for io in inputs:
            hidden_of(*io)
    except TypeError as e:
        if at is not None:
            raise ValueError(f"GPTQ streamed: {at.name} {e}; only blocks that take the hidden states stream") from e
        log.info("GPTQ in whole-model order: %s", e)
        return targets
    if len(inputs) != len(batches):
        if at is not None:
            raise ValueError(f"GPTQ streamed: {len(inputs)} recorded inputs of {at.name} for {len(batches)} "
                             "calibration batches")
        return targets
    masks = [mask_of(b) for b in batches]
    done: set[str] = set()
    for block_name in track(blocks, "quantize: GPTQ", unit="block"):
        block = model.get_submodule(block_name)
        inside = {t: model.get_submodule(t) for t in targets if t.startswith(f"{block_name}.")}
        calls = [ExampleInputs(args, kwargs) for args, kwargs in inputs]
        groups = call_order(block, inside, calls[0]).groups(inside)[0] if inside else []
        inside.clear()  # the float layers: each is freed once its group's packed layers replace it (a 1B Llama's
        # gate and up projections, 128 MiB, stayed beside down_proj's 512 MiB Hessian)
        for group in groups:
            stats = layer_input_stats(block, {n: model.get_submodule(n) for n in group}, calls, statistic, masks)
            quantize_group(group, stats)
            done.update(group)
            del stats
            give_back_memory()  # the group's Gram matrices (k x k each)
        inputs = next_inputs(block, inputs)
    if at is not None:
        at.next_inputs = inputs
    missed = [t for t in targets if t.startswith(tuple(f"{b}." for b in blocks)) and t not in done]
    if missed:
        raise ValueError(f"quantize: the calibration data never reaches {missed[:3]}; give inputs that run "
                         "every layer, or skip those layers")
    return [t for t in targets if t not in done]
