"""Block-wise healing: fit each block of the student to the teacher's block, one block at a time.

The teacher and the student run once per calibration batch to record what each of their blocks is
called with (hidden states aside: masks, positions, T5's position bias). Then, block by block, the
student's block ``i`` is trained on the student's own hidden states entering it to give the teacher's
block ``i`` output for the teacher's hidden states (so it also corrects the drift of the blocks before
it), with a normalised MSE plus cosine loss on unpadded tokens. Only the hidden states entering the
current block are held: memory grows with one block, not with the model (BRECQ, Li et al. 2021;
GPTQ's block order). Blocks must correspond one to one (``prune``, ``dyt``, ``quantize``,
``replace_blocks(n=1)``); an end-to-end pass can follow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphopt.analysis.blocks import find_blocks, first_tensor, hidden_of
from graphopt.analysis.calibration import mask_of
from graphopt.analysis.hooked import Stop, run_hooked
from graphopt.analysis.manager import AnalysisManager, Analyzable, register_analysis
from graphopt.progress import Progress

log = logging.getLogger(__name__)

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

Put = Callable[[torch.Tensor], tuple[tuple, dict]]  # (args, kwargs) of a block call with other hidden states


def _without_hidden(args: tuple, kwargs: dict) -> Put:
    """How to call a block as it was called, with other hidden states (the recorded ones are not kept)."""
    if args and isinstance(args[0], torch.Tensor):
        rest = args[1:]
        return lambda h: ((h, *rest), kwargs)
    others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return lambda h: (args, {**others, "hidden_states": h})


def _calls(model: nn.Module, blocks: list[nn.Module], batch: Any) -> tuple[list[Put], torch.Tensor]:
    """How each block is called on ``batch``, and the hidden states entering the first block."""
    puts: list[Put] = []
    first: list[torch.Tensor] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not first:
            first.append(hidden_of(args, kwargs)[0].detach())
        puts.append(_without_hidden(args, kwargs))
        if len(puts) == len(blocks):
            raise Stop

    run_hooked(model, [batch], [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks])
    return puts, first[0]


@register_analysis("matching_blocks")
def _matching_blocks(program: Analyzable, am: AnalysisManager) -> tuple[list[str], str]:
    """The blocks the original model (heal's teacher) and the program's model have one to one, with outputs of
    one shape, found on the example inputs: ``(names, "")``, or ``([], why there are none)`` (no repeated
    blocks, a depth rewrite removed some, a prune narrowed their outputs). Heal's recipe, its per-block feature
    terms and its block-wise stage all read this one analysis."""
    original = getattr(program, "original", None)
    if original is None:
        return [], "there is no original model to match"
    try:
        return _matching_names(original, program.module, program.example_inputs), ""
    except (ValueError, TypeError) as e:
        return [], str(e)


def _first_output_shape(model: nn.Module, block: nn.Module, batch: Any) -> tuple[int, ...] | None:
    shapes: list[tuple[int, ...]] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        t = first_tensor(out)
        shapes.append(tuple(t.shape) if t is not None else ())
        raise Stop

    run_hooked(model, [batch], [block.register_forward_hook(hook)])
    return shapes[0] if shapes else None


def _matching_names(teacher: nn.Module, student: nn.Module, batch: Any) -> list[str]:
    t_list = find_blocks(teacher, batch)
    s_list = dict(student.named_modules()).get(t_list.path)
    if not isinstance(s_list, nn.ModuleList) or len(s_list) != len(t_list):
        raise ValueError(f"the student has no {len(t_list)} blocks at {t_list.path} to match the teacher's one to "
                         "one (a depth rewrite removed some)")
    shapes = [_first_output_shape(m, blocks[0], batch) for m, blocks in ((teacher, [teacher.get_submodule(n) for n in t_list.names]),
                                                                      (student, s_list))]
    if shapes[0] != shapes[1]:
        raise ValueError(f"the blocks at {t_list.path} give outputs of shape {list(shapes[1] or ())} in the student and "
                         f"{list(shapes[0] or ())} in the teacher (a prune narrowed the hidden size): block outputs "
                         "cannot be compared")
    return t_list.names


def heal_blocks(teacher: nn.Module, student: nn.Module, names: list[str], batches: list, trainable: set[int],
                loss_fn: Loss, *, steps: int, lr: float, seed: int, clip: float) -> list[tuple[float, float]]:
    """Train each block ``names`` of ``student`` (its parameters in ``trainable``, by id) ``steps`` steps on
    ``loss_fn(out, target, mask)`` to match the teacher's block of that name (``"matching_blocks"``); returns
    each block's loss before and after, on the calibration batches."""
    t_blocks, s_blocks = [teacher.get_submodule(n) for n in names], [student.get_submodule(n) for n in names]
    t_calls, t_hidden = zip(*[_calls(teacher, t_blocks, b) for b in batches])
    s_calls, s_hidden = zip(*[_calls(student, s_blocks, b) for b in batches])
    t_hidden, s_hidden = list(t_hidden), list(s_hidden)
    masks = [mask_of(b) for b in batches]
    g = torch.Generator().manual_seed(seed)
    report = []
    progress = Progress("heal block-wise", total=len(s_blocks), unit="block")
    for i, (tb, sb) in enumerate(zip(t_blocks, s_blocks)):
        with torch.no_grad():
            targets = [first_tensor(tb(*calls[i](h)[0], **calls[i](h)[1])).detach()
                       for calls, h in zip(t_calls, t_hidden)]

        def run(j: int, block: nn.Module = sb, i: int = i, hidden: list = s_hidden) -> torch.Tensor:
            args, kwargs = s_calls[j][i](hidden[j])
            return first_tensor(block(*args, **kwargs))

        def error(run=run, targets=targets) -> float:
            with torch.no_grad():
                return sum(float(loss_fn(run(j), targets[j], masks[j])) for j in range(len(batches))) / len(batches)

        before = error()
        params = [p for p in sb.parameters() if id(p) in trainable]
        if params and steps:
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
            saved = [p.detach().clone() for p in params]
            opt = torch.optim.Adam(params, lr=lr)
            with torch.enable_grad():
                for _ in range(steps):
                    j = int(torch.randint(len(batches), (1,), generator=g))
                    loss = loss_fn(run(j), targets[j], masks[j])
                    opt.zero_grad()
                    loss.backward()
                    if clip > 0:
                        nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None  # (kept, the gradients of every block would add up to the model's size)
            after = error()
            if not after <= before:  # never leave a block worse than it was
                with torch.no_grad():
                    for p, old in zip(params, saved):
                        p.copy_(old)
                after = before
        else:
            after = before
        report.append((before, after))
        log.info("heal blockwise: block %d loss %.4g -> %.4g", i, before, after)
        with torch.no_grad():
            s_hidden = [run(j).detach() for j in range(len(batches))]
        t_hidden = targets
        progress.update(loss=f"{before:.4g} -> {after:.4g}")
    progress.close()
    return report
