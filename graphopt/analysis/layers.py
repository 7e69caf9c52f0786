"""Linear layers as the passes see them: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), weights as ``[out, in]``;
which of them is the vocabulary projection (LM head), and which embedding tables are tied to a layer."""

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


def output_embeddings(model: nn.Module) -> set[int]:
    """Ids of the vocabulary projections: HF's ``get_output_embeddings()``, and any layer tied to an embedding."""
    heads: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        heads.add(id(head))
    return heads | {id(model.get_submodule(layer)) for layer in tied_tables(model).values()}


def tied_tables(model: nn.Module) -> dict[str, str]:
    """Embedding tables whose weight is another layer's weight (a tied LM head): table name -> layer name."""
    by_weight = {id(m.weight): n for n, m in model.named_modules()
                 if n and not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    return {n: by_weight[id(m.weight)] for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and id(m.weight) in by_weight}
