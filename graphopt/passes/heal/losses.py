"""heal's losses: normalised MSE, cosine distance and KL on logits over unpadded positions, and the
forward hooks that collect block outputs for the feature terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.analysis.blocks import first_tensor


class Features:
    """Forward hooks that keep the outputs of named blocks of one model during a call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = first_tensor(out)
            if t is not None and t.is_floating_point():
                self.values[name] = t
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def position_mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-position loss ``(B, T, ...)`` over positions where ``mask`` (B, T) is set."""
    if mask is not None and per_pos.dim() >= 2 and tuple(per_pos.shape[:2]) == tuple(mask.shape):
        w = mask.to(per_pos.dtype).reshape(*mask.shape, *([1] * (per_pos.dim() - 2))).expand_as(per_pos)
        return (per_pos * w).sum() / w.sum().clamp_min(1.0)
    return per_pos.mean()


def nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Squared error over the teacher's mean square (scale-free), padding excluded."""
    s, t = student.float(), teacher.float()
    return position_mean((s - t).pow(2), mask) / position_mean(t.pow(2), mask).clamp_min(1e-12)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``1 - cos`` over the last dim, averaged over positions, padding excluded."""
    cos = nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return position_mean(1.0 - cos, mask)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """``KL(teacher || student)`` of softmax(logits / T), times T², averaged over positions."""
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return position_mean(kl, mask) * temperature**2
