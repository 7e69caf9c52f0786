"""Low-rank adapters for ``heal(lora=r)``, merged into the weights at the end (no extra modules remain).

Each target layer (``nn.Linear`` or GPT-2's ``Conv1D`` whose name matches the glob) gets
``y += (α / r) · x Aᵀ Bᵀ`` through a forward hook, ``A`` random and ``B`` zero at the start (so the model
is unchanged until it trains; Hu et al. 2021, "LoRA"). The adapters live outside the model: training
them touches no module, and :meth:`LoRA.merge` adds ``(α / r) · B A`` into each weight and removes the
hooks, so the result has the structure it had before. Memory for the optimiser state is that of
the adapters only.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from graphopt.analysis.layers import is_conv1d
from graphopt.nn.quant import QuantLinear


class LoRA:
    """Adapters on the layers of ``model`` whose names match ``targets``."""

    def __init__(self, model: nn.Module, rank: int, targets: str = "*", alpha: float | None = None,
                 seed: int = 0) -> None:
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        g = torch.Generator().manual_seed(seed)
        self.layers: dict[str, tuple[nn.Module, nn.Parameter, nn.Parameter]] = {}
        self.handles = []
        for name, m in model.named_modules():
            if not ((isinstance(m, nn.Linear) or is_conv1d(m)) and fnmatch.fnmatchcase(name, targets)):
                continue
            w = m.weight
            d_in, d_out = (w.shape[1], w.shape[0]) if isinstance(m, nn.Linear) else (w.shape[0], w.shape[1])
            if rank >= min(d_in, d_out):  # an adapter that wide is a full update: train the weights instead
                self.remove()
                raise ValueError(f"heal(lora={rank}): {name} is {d_out} x {d_in}, so a rank-{rank} adapter is no "
                                 f"low-rank update; give lora < {min(d_in, d_out)} (or lora_targets= fewer layers), "
                                 "or heal without lora")
            a = torch.randn(rank, d_in, generator=g, dtype=torch.float32) / math.sqrt(d_in)
            a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
            b = nn.Parameter(torch.zeros(d_out, rank, device=w.device, dtype=w.dtype))
            self.layers[name] = (m, a, b)
            self.handles.append(m.register_forward_hook(self._hook(a, b)))
        if not self.layers:
            self.remove()
            quantized = any(isinstance(m, QuantLinear) for m in model.modules())
            raise ValueError(f"heal(lora=...): lora_targets={targets!r} matches no Linear / Conv1D layer" + (
                "; the linear layers are quantized (integer codes, nothing to merge adapters into): heal before "
                "quantize, or use heal without lora (end-to-end or blockwise=...)" if quantized else ""))

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + self.scale * (args[0] @ a.T) @ b.T
        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.layers.values() for p in (a, b)]

    def merge(self) -> None:
        """Add the adapters into the weights and remove the hooks."""
        with torch.no_grad():
            for m, a, b in self.layers.values():
                delta = self.scale * (b @ a)  # [out, in]
                m.weight += delta if isinstance(m, nn.Linear) else delta.T
        self.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
