"""quantize: weight-only int8 / int4 / ternary quantization of Linear layers (round to nearest).

Every ``nn.Linear`` and HuggingFace ``Conv1D`` (GPT-2's transposed linear) in scope becomes a
:class:`graphopt.nn.quant.QuantLinear` holding packed codes and per-channel or per-group scales.
Left alone, each with a diagnostic: the vocabulary projection (the LM head: HF's output embeddings,
or a layer tied to an embedding table; the most sensitive layer; ``lm_head=true`` quantizes it),
embedding tables, layers outside ``where`` or inside ``skip``, and non-float weights.
Not yet here (the quantization issue's later slices): GPTQ,
mixed precision, w8a8, quantized ONNX operators and compressed-tensors checkpoints.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import field
from typing import Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass
from graphopt.nn.quant import BACKENDS, QuantLinear

log = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of a Linear or Conv1D, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_conv1d(module):
        return module.weight.t(), module.bias
    return None


def output_embeddings(model: nn.Module) -> set[int]:
    """Ids of the vocabulary projections: HF's ``get_output_embeddings()``, and any layer tied to an embedding."""
    heads: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        heads.add(id(head))
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads |= {id(m) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
              and not isinstance(m, nn.Embedding) and id(m.weight) in tables}
    return heads


@register_pass("quantize", tolerance=None)
class Quantize(Pass):
    """Quantize Linear weights to int8 / int4 / ternary (packed, per channel or per group)."""

    scheme: Literal["int8", "int4", "ternary"] = "int8"
    group_size: int = 128
    method: Literal["rtn"] = "rtn"
    where: str = "*"
    skip: list[str] = field(default_factory=list)  # globs of module names left in float
    lm_head: bool = False
    backend: Literal["auto", "torch", "int8_mm"] = "auto"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        if self.group_size < 0:
            raise ValueError(f"quantize(group_size={self.group_size}): give 0 (one scale per channel) or a "
                             "positive group size such as 32, 64 or 128")
        if self.backend not in BACKENDS:
            raise ValueError(f"quantize(backend={self.backend!r}): choose from {', '.join(BACKENDS)}")
        if program.device.type == "meta":
            raise ValueError("quantize needs real weights; the model is on the meta device (load its weights first)")
        result = PassResult(modified=False)
        model = program.module
        heads = output_embeddings(model)
        before = after = n_weights = count = 0
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Embedding):
                result.skip(name, "embedding table: stays in float (packed embedding rows are not supported yet)")
                continue
            found = linear_weight(module)
            if found is None or not name:
                continue
            weight, bias = found
            why = self._why_not(name, module, weight, heads)
            if why:
                result.skip(name, why)
                continue
            layer = QuantLinear.from_linear(weight, bias, scheme=self.scheme, group_size=self.group_size,
                                            backend=self.backend)
            program.replace_module(name, layer)
            before += weight.numel() * weight.element_size()
            after += layer.weight_bytes
            n_weights += weight.numel()
            count += 1
        if count:
            result.modified = True
            result.stats.update({"layers": count, "weight_mb_before": round(before / 2**20, 4),
                                 "weight_mb_after": round(after / 2**20, 4),
                                 "bits_per_weight": round(8 * after / n_weights, 3)})
        else:
            result.note("", "no Linear layer was quantized (see the diagnostics for each one left alone)", "warning")
        return result

    def _why_not(self, name: str, module: nn.Module, weight: torch.Tensor, heads: set[int]) -> str:
        if not fnmatch.fnmatchcase(name, self.where):
            return f"outside where={self.where!r}"
        matched = next((g for g in self.skip if fnmatch.fnmatchcase(name, g)), None)
        if matched:
            return f"in skip ({matched!r})"
        if not weight.is_floating_point():
            return f"weight is {weight.dtype}, not floating point"
        if not self.lm_head and id(module) in heads:
            return ("the vocabulary projection (LM head): the most sensitive layer stays in float; "
                    "quantize(lm_head=true) quantizes it")
        return ""
