"""Linear layers as the passes see them: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), weights as ``[out, in]``."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of a Linear or Conv1D, else ``None``."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return weight_rows(module, module.weight), module.bias
    return None


def weight_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, shaped like ``module.weight`` (the weight, a gradient), as one row per output: a Conv1D's transposed,
    a Conv2d's ``[out, in / groups x kh x kw]`` (the layout of quantized convolutions), a Linear's as it is."""
    if isinstance(module, nn.Conv2d):
        return t.reshape(t.shape[0], -1)
    return t.t() if is_conv1d(module) else t


def why_not_plain(module: nn.Module, base: type[nn.Module]) -> str:
    """``""`` when ``module`` computes exactly what ``base`` does from its weights (its class's forward is
    ``base.forward`` and no forward hook is attached), else why a pass that rebuilds it from its weights
    would change what the model computes."""
    if type(module).forward is not base.forward:
        return (f"{type(module).__name__} overrides {base.__name__}.forward (a wrapper or an adapter): a layer "
                "rebuilt from its weights would drop what it adds, so it stays as it is")
    hooks = [kind for kind, registered in (("forward pre-hook", module._forward_pre_hooks),
                                            ("forward hook", module._forward_hooks)) if registered]
    if hooks:
        return (f"it has a {' and a '.join(hooks)}, which a replacement would not carry, so it stays as it is "
                "(remove the hook first to rewrite it)")
    return ""
