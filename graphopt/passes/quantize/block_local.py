"""``quantize`` one block at a time, for a model streamed from disk (:mod:`graphopt.stream`).

Round to nearest and GPTQ by block are block-local: a layer's codes depend on its weights and (GPTQ) on the
inputs its block receives, which the streamed run records. Options that rank, smooth or correct across the whole
model are not, and refuse with why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .algorithms import rounding

Quantize = Any  # the pass (quantize.py imports this module)


def restricted_to_block(q: Quantize, block: str) -> Quantize | str:
    """``q`` on the layers of ``block`` only, or why it needs the whole model."""
    whole = [why for why in (
        "progressive heals the whole model after each block" if q.progressive else "",
        "budget_bits ranks every layer of the model in one backward pass" if q.budget_bits is not None else "",
        "bias_correction measures its shifts on the whole model" if q.bias_correction else "",
        "SmoothQuant folds its scales across layers found on the whole model's graph (give alpha=0)"
        if q._any_w8a8() and (q.alpha is None or q.alpha > 0) else "",
        "the LM head and embedding tables lie outside the blocks" if q.lm_head or q.embeddings else "",
        "where= selects layers across the model (use skip= to keep layers in float)" if q.where != "*" else "",
        "by_block=false runs the whole model for each group of layers" if not q.by_block else "",
    ) if why]
    if whole:
        return f"quantize needs the whole model here: {'; '.join(whole)}"
    return dataclasses.replace(q, where=f"{block}.*")


def restricted_outside(q: Quantize, blocks: list[str], outside: list[str]) -> Quantize | str | None:
    """``q`` on its target layers ``outside`` the blocks (None: there are none), or why they stay in float."""
    if not outside:
        return None
    if rounding(q.method, damp=q.damp, act_order=q.act_order).sequential:
        shown = ", ".join(outside[:3]) + (f" (+{len(outside) - 3})" if len(outside) > 3 else "")
        return (f"{shown} stay in float: they lie outside the blocks, and {q.method} would read their inputs "
                "from a forward of the whole model (stream with method=rtn, or quantize them after loading)")
    return dataclasses.replace(q, skip=[*q.skip, *(f"{b}.*" for b in blocks)])
