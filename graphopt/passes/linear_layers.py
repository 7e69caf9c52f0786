"""Linear layers as the passes see them: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), weights as ``[out, in]``."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of a Linear or Conv1D, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if is_conv1d(module):
        return module.weight.t(), module.bias
    return None
