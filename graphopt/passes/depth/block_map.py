"""The linear map that stands in for a span of blocks (ReplaceMe, Shopkhoev et al. 2025,
"Network Simplification via Layer Pruning and Linear Transformations").

Two forms, chosen by a test on the model, not by its name:

- **fold** (pre-norm blocks: Llama, Qwen2, Mistral, GPT-2): the block before the span ends with
  ``out = Y + M``, ``M`` the output of its MLP down-projection. The span is replaced by
  ``Y + M T (+ c)``, with ``T = argmin |M T - (L - Y)|²`` (``L`` the hidden states after the span);
  ``T`` folds into the down-projection (``W ← Tᵀ W``, ``b ← b T + c``), so no parameter is added.
  The test: doubling the down-projection's output must add exactly ``M`` to the block's output.
- **linear** (post-norm blocks such as BERT's, a span at the start, or no fold): a
  :class:`~graphopt.nn.depth.LinearBlock` ``L ≈ X T + c`` takes the span's place, ``X`` its input.

``method=cosine`` refines the least-squares ``T`` by Adam on the cosine distance between the
approximated and the true hidden states after the span, on a bounded sample of calibration rows.
Statistics are streamed (float64 Gram matrices), and padding rows left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphopt.analysis.blocks import BlockList, first_block_inputs, first_tensor, hidden_of
from graphopt.analysis.depth_stats import LinearMapStats, masked_batches, rows_of
from graphopt.analysis.hooked import Stop, call_order, run_hooked
from graphopt.analysis.layers import is_conv1d
from graphopt.frontend.inputs import ExampleInputs
from graphopt.nn.depth import LinearBlock, output_structure

log = logging.getLogger(__name__)


@dataclass
class SpanMap:
    """The estimated map of a span: ``T`` [d, d], ``c`` [d] or None, and the form it takes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    fold_into: str | None  # the down-projection it folds into; None: a LinearBlock
    cosine_before: float | None = None  # on the sample, for method=cosine
    cosine_after: float | None = None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def down_projection(model: nn.Module, block_name: str, batch: Any) -> str | None:
    """The last Linear / Conv1D that ``block_name`` runs, when the block's output is ``Y + (its output)``."""
    block = model.get_submodule(block_name)
    calls = first_block_inputs(model, block, [batch])
    if not calls:
        return None
    args, kwargs = calls[0]
    linears = {n: m for n, m in block.named_modules() if _is_linear(m)}
    groups, _ = call_order(block, linears, ExampleInputs(args, kwargs)).groups(linears)
    with torch.no_grad():
        base = first_tensor(block(*args, **kwargs))
    if not groups or base is None:
        return None
    last = block.get_submodule(groups[-1][-1])
    seen: list[torch.Tensor] = []

    def double(module: nn.Module, a: Any, out: torch.Tensor) -> torch.Tensor:
        seen.append(out)
        return out * 2

    handle = last.register_forward_hook(double)
    try:
        with torch.no_grad():
            doubled = first_tensor(block(*args, **kwargs))
    finally:
        handle.remove()
    if doubled is None or len(seen) != 1 or seen[0].shape != base.shape:
        return None
    scale = float(seen[0].abs().max().clamp_min(1e-12))
    if float((doubled - base - seen[0]).abs().max()) > 1e-4 * scale:
        return None
    return f"{block_name}.{groups[-1][-1]}"


def estimate_map(model: nn.Module, blocks: BlockList, start: int, n: int, batches: Iterable[Any],
                 fold_into: str | None, *, sample: bool = True) -> tuple[LinearMapStats, Any]:
    """Stream the span's statistics; returns them and the span's output structure (for a LinearBlock).
    ``sample``: keep a bounded sample of rows too (for ``refine_cosine``)."""
    last = model.get_submodule(blocks.names[start + n - 1])
    rec: dict[str, Any] = {}
    mask: list[torch.Tensor | None] = [None]
    stats: list[LinearMapStats] = []
    has_bias = fold_into is None or model.get_submodule(fold_into).bias is not None
    handles = []
    if fold_into is not None:
        kept = model.get_submodule(blocks.names[start - 1])
        handles.append(model.get_submodule(fold_into).register_forward_hook(
            lambda m, a, out: rec.__setitem__("m", out)))
        handles.append(kept.register_forward_hook(lambda m, a, out: rec.__setitem__("out", first_tensor(out))))
    else:
        first = model.get_submodule(blocks.names[start])
        handles.append(first.register_forward_pre_hook(
            lambda m, a, kw: rec.__setitem__("x", hidden_of(a, kw)[0]), with_kwargs=True))

    def at_end(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if "structure" not in rec:
            try:
                rec["structure"] = output_structure(out, args, kwargs)
            except ValueError as e:
                rec["structure"] = e
        target = first_tensor(out)
        if fold_into is not None:
            x = rows_of(rec["m"], mask[0])
            base = rows_of(rec["out"], mask[0]) - x
        else:
            x = rows_of(rec["x"], mask[0])
            base = torch.zeros_like(x)
        if not stats:
            stats.append(LinearMapStats(x.shape[-1], target.shape[-1], bias=has_bias,
                                        sample_bytes=(1 << 28) if sample else 0))
        stats[0].add(x, rows_of(target, mask[0]), base)
        raise Stop

    handles.append(last.register_forward_hook(at_end, with_kwargs=True))

    run_hooked(model, masked_batches(batches, mask), handles)
    if not stats:
        raise ValueError("the calibration data never reached the blocks to replace")
    return stats[0], rec.get("structure")


def _mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8).mean())


def refine_cosine(stats: LinearMapStats, weight: torch.Tensor, bias: torch.Tensor | None, *, steps: int,
                  lr: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """Adam on ``1 - cos(base + X T + c, Y)`` over the sampled rows, from the least-squares solution.

    Returns the map and the sample's mean cosine before and after; the map is the least-squares one
    when refining did not improve it."""
    x, y, base = stats.samples()
    t = weight.clone().requires_grad_(True)
    c = bias.clone().requires_grad_(True) if bias is not None else None
    params = [t] + ([c] if c is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)

    def predict(rows: slice | torch.Tensor) -> torch.Tensor:
        out = base[rows] + x[rows] @ t
        return out + c if c is not None else out

    with torch.no_grad():
        before = _mean_cosine(predict(slice(None)), y)
    batch = min(1024, x.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            loss = 1 - nn.functional.cosine_similarity(predict(idx), y[idx], dim=-1, eps=1e-8).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = _mean_cosine(predict(slice(None)), y)
    if after <= before:
        return weight, bias, before, before
    return t.detach(), (c.detach() if c is not None else None), before, after


def folded_tensors(model: nn.Module, down: str, weight: torch.Tensor, bias: torch.Tensor | None
         ) -> dict[str, torch.Tensor]:
    """The new tensors of down-projection ``down`` with ``T`` (and ``c``) folded in (name -> value)."""
    layer = model.get_submodule(down)
    w = layer.weight.detach()
    t = weight.to(device=w.device, dtype=torch.float64)
    new_w = torch.empty_like(w)
    step = max(1, (16 << 20) // (8 * t.shape[0]))  # 16 MiB of float64 at a time (a 8192-wide MLP's weight: 64 MiB)
    if is_conv1d(layer):  # [in, out]: the map acts on the output columns
        for i in range(0, w.shape[0], step):
            new_w[i:i + step] = w[i:i + step].double() @ t
    else:  # [out, in]: on the output rows
        for j in range(0, w.shape[1], step):
            new_w[:, j:j + step] = t.T @ w[:, j:j + step].double()
    out = {f"{down}.weight": new_w}
    if layer.bias is not None:
        b = layer.bias.detach().double() @ t
        if bias is not None:
            b = b + bias.to(b)
        out[f"{down}.bias"] = b.to(layer.bias.dtype)
    return out


def linear_block(weight: torch.Tensor, bias: torch.Tensor | None, structure: Any, n: int,
                 like: torch.Tensor) -> LinearBlock:
    """A :class:`LinearBlock` computing ``h T + c`` on ``like``'s device and dtype."""
    block = LinearBlock(weight.shape[0], bias=bias is not None, outputs=structure, replaces=n)
    with torch.no_grad():
        block.linear.weight.copy_(weight.T)
        if bias is not None:
            block.linear.bias.copy_(bias)
    return block.to(device=like.device, dtype=like.dtype)
