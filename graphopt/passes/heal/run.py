"""One end-to-end ``heal`` run: teacher outputs cached, held-out checks, the best parameters kept.

The held-out batches are never trained on. They are scored before training, after the block-wise
stage, and every ``eval_every`` steps; the parameters with the lowest held-out loss are kept (one
copy of the trained parameters) and put back at the end, so training past the best point costs
time but never quality. ``patience`` checks in a row without a relative improvement of
``min_delta`` stop the run early.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from graphopt.analysis.calibration import mask_of
from graphopt.frontend.inputs import as_example_inputs, flatten_outputs
from graphopt.infra.program import Program
from graphopt.progress import Progress

from .losses import Features

log = logging.getLogger(__name__)

_CACHE_BYTES = 1 << 30  # teacher outputs kept in memory across epochs up to this size

Outputs = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (model outputs, block features)


class Schedule(Protocol):
    """What a run reads of its ``heal`` pass: the training options, its loss and its learning-rate schedule."""

    steps: int
    lr: float
    new_lr_scale: float
    seed: int
    warmup: int
    weight_decay: float
    clip: float
    eval_every: int | None
    patience: int
    min_delta: float
    progress: bool | None

    def loss_of(self, student_out: Any, teacher_out: dict[str, torch.Tensor], s_feats: dict[str, torch.Tensor],
                t_feats: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor: ...

    def lr_factor(self, step: int) -> float: ...


class HealRun:
    """Training state of one heal: ``check`` scores the held-out batches, ``train`` runs the steps.

    Parameters whose ``id`` is in ``fast`` train at ``heal.new_lr_scale`` times the learning rate.
    """

    def __init__(self, heal: Schedule, program: Program, batches: list[Any], held: list[int],
                 params: list[nn.Parameter], t_hooks: Features, s_hooks: Features, fast: Collection[int] = ()
                 ) -> None:
        self.heal, self.program, self.batches, self.held, self.params = heal, program, batches, held, params
        self.fast = fast
        self.t_hooks, self.s_hooks = t_hooks, s_hooks
        self.cache: dict[int, Outputs] = {}
        self.cached_bytes = 0
        self.best = math.inf
        self.best_step = 0
        self.best_params = [p.detach().clone() for p in params]
        self.step = 0
        self.flat = 0  # held-out checks since the last improvement

    def close(self) -> None:
        self.t_hooks.close()
        self.s_hooks.close()

    # --- losses ---------------------------------------------------------------------------------------
    def _teacher(self, index: int, inputs: Any) -> Outputs:
        if index in self.cache:
            return self.cache[index]
        with torch.no_grad():
            out = flatten_outputs(inputs.call(self.program.original))
        value = ({k: v.detach() for k, v in out.items() if v.is_floating_point()},
                 {k: v.detach() for k, v in self.t_hooks.take().items()})
        size = sum(t.numel() * t.element_size() for part in value for t in part.values())
        if self.cached_bytes + size <= _CACHE_BYTES:
            self.cache[index] = value
            self.cached_bytes += size
        return value

    def loss(self, index: int) -> torch.Tensor:
        inputs = as_example_inputs(self.batches[index]).to(self.program.device)
        t_out, t_feats = self._teacher(index, inputs)
        s_out = inputs.call(self.program.module)
        return self.heal.loss_of(s_out, t_out, self.s_hooks.take(), t_feats, mask_of(inputs))

    def check(self) -> float:
        """The mean held-out loss now; the parameters are kept when it is the best so far."""
        with torch.no_grad():
            value = sum(float(self.loss(i)) for i in self.held) / len(self.held)
        if not math.isfinite(value):
            return value
        if value < self.best:
            improved = value < self.best * (1.0 - self.heal.min_delta)
            self.best, self.best_step = value, self.step
            with torch.no_grad():
                for keep, p in zip(self.best_params, self.params):
                    keep.copy_(p)
            self.flat = 0 if improved else self.flat + 1
        else:
            self.flat += 1
        return value

    def restore_best(self) -> float:
        """Put the best parameters seen back; returns their held-out loss."""
        with torch.no_grad():
            for keep, p in zip(self.best_params, self.params):
                p.copy_(keep)
        return self.best

    # --- training -------------------------------------------------------------------------------------
    @staticmethod
    def _order(indices: list[int], gen: torch.Generator) -> Iterator[int]:
        while True:
            yield from (indices[i] for i in torch.randperm(len(indices), generator=gen).tolist())

    def train(self, indices: list[int]) -> tuple[int, float]:
        """Up to ``heal.steps`` steps on the batches ``indices``; returns the steps run and the last loss (EMA)."""
        h = self.heal
        every = h.eval_every or max(10, h.steps // 10)
        order = self._order(indices, torch.Generator().manual_seed(h.seed))
        groups = [{"params": [p for p in self.params if (id(p) in self.fast) == fast], "scale": scale}
                  for fast, scale in ((False, 1.0), (True, h.new_lr_scale))]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=h.lr, weight_decay=h.weight_decay)
        ema, self.flat = math.nan, 0
        bar = Progress("heal", total=h.steps, unit="step", bar=h.progress)
        with torch.random.fork_rng(devices=[]), bar:
            torch.manual_seed(h.seed)
            for step in range(h.steps):
                for group in opt.param_groups:
                    group["lr"] = h.lr * group["scale"] * h.lr_factor(step)
                loss = self.loss(next(order))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"heal: loss became {float(loss.detach())} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if h.clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, h.clip)
                opt.step()
                self.step = step + 1
                value = float(loss.detach())
                ema = value if math.isnan(ema) else 0.9 * ema + 0.1 * value
                checked = self.step % every == 0 or self.step == h.steps
                if checked:
                    held = self.check()
                    bar.postfix["held_out"] = f"{held:.4g}"
                bar.update(loss=f"{ema:.4g}")
                if checked and h.patience and self.flat >= h.patience and step >= h.warmup:
                    log.info("heal: early stop at step %d (held-out loss %.4g, best %.4g at step %d)",
                             self.step, held, self.best, self.best_step)
                    break
        return self.step, ema
