"""quantize: weight-only int8 / int4 / ternary quantization of Linear layers (round to nearest, or GPTQ).

Every ``nn.Linear`` and HuggingFace ``Conv1D`` (GPT-2's transposed linear) in scope becomes a
:class:`graphopt.nn.quant.QuantLinear` holding packed codes and per-channel or per-group scales.
Left alone, each with a diagnostic: the vocabulary projection (the LM head: HF's output embeddings,
or a layer tied to an embedding table; the most sensitive layer; ``lm_head=true`` quantizes it),
embedding tables, layers outside ``where`` or inside ``skip``, and non-float weights.
``method=gptq`` rounds with the inputs' Hessian (:mod:`.gptq`), one group of layers at a time in
forward order, on the activations of the already-quantized model (:mod:`graphopt.analysis.calibration`).
Not yet here (the quantization issue's later slices): mixed precision, w8a8, quantized ONNX
operators and compressed-tensors checkpoints.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from dataclasses import field
from typing import Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.analysis.calibration import layer_input_grams
from graphopt.frontend.inputs import as_example_inputs
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass
from graphopt.nn.quant import BACKENDS, QuantLinear

from .gptq import gptq_quantize

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
    method: Literal["rtn", "gptq"] = "rtn"
    where: str = "*"
    skip: list[str] = field(default_factory=list)  # globs of module names left in float
    lm_head: bool = False
    backend: Literal["auto", "torch", "int8_mm"] = "auto"
    damp: float = 0.01  # GPTQ: added to the Hessian's diagonal, as a fraction of its mean
    act_order: bool = True  # GPTQ: columns with the largest Hessian diagonal first (measured better on MiniLM)
    calib_batches: int = 32  # GPTQ: calibration batches read per group of layers

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]  # only GPTQ reads calibration data
        return self.method == "gptq"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        if self.group_size < 0:
            raise ValueError(f"quantize(group_size={self.group_size}): give 0 (one scale per channel) or a "
                             "positive group size such as 32, 64 or 128")
        if self.backend not in BACKENDS:
            raise ValueError(f"quantize(backend={self.backend!r}): choose from {', '.join(BACKENDS)}")
        if not 0 <= self.damp < 1 or self.calib_batches < 1:
            raise ValueError("quantize: damp must be in [0, 1) and calib_batches >= 1")
        if program.device.type == "meta":
            raise ValueError("quantize needs real weights; the model is on the meta device (load its weights first)")
        result = PassResult(modified=False)
        model = program.module
        heads = output_embeddings(model)
        targets: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                result.skip(name, "embedding table: stays in float (packed embedding rows are not supported yet)")
                continue
            found = linear_weight(module)
            if found is None or not name:
                continue
            why = self._why_not(name, module, found[0], heads)
            if why:
                result.skip(name, why)
            else:
                targets.append(name)
        if not targets:
            result.note("", "no Linear layer was quantized (see the diagnostics for each one left alone)", "warning")
            return result
        before = after = n_weights = 0
        for group in (self._sequential_groups(program, targets) if self.method == "gptq" else [targets]):
            grams = (layer_input_grams(model, {n: program.get_submodule(n) for n in group}, self._batches(program))
                     if self.method == "gptq" else {})
            for name in group:
                weight, bias = linear_weight(program.get_submodule(name))
                codes = (gptq_quantize(weight, grams[name].mean(), self.scheme, self.group_size, damp=self.damp,
                                       act_order=self.act_order) if name in grams else None)
                layer = QuantLinear.from_linear(weight, bias, scheme=self.scheme, group_size=self.group_size,
                                                backend=self.backend, codes=codes)
                program.replace_module(name, layer)
                before += weight.numel() * weight.element_size()
                after += layer.weight_bytes
                n_weights += weight.numel()
        result.modified = True
        result.stats.update({"layers": len(targets), "weight_mb_before": round(before / 2**20, 4),
                             "weight_mb_after": round(after / 2**20, 4),
                             "bits_per_weight": round(8 * after / n_weights, 3)})
        return result

    def _batches(self, program: Program) -> list:
        return list(itertools.islice(iter(program.calib), self.calib_batches))

    def _sequential_groups(self, program: Program, targets: list[str]) -> list[list[str]]:
        """``targets`` in the order the forward reaches them, layers that read the same tensor together.

        GPTQ then quantizes one group at a time on the inputs the already-quantized layers produce.
        """
        first: dict[str, int] = {}
        order: list[str] = []

        def hook(name: str):
            def record(module: nn.Module, args: tuple) -> None:
                if name not in first:
                    first[name] = id(args[0])
                    order.append(name)
            return record

        handles = [program.get_submodule(n).register_forward_pre_hook(hook(n)) for n in targets]
        try:
            with torch.no_grad():
                as_example_inputs(self._batches(program)[0]).call(program.module)
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        for name in order:
            if groups and first[groups[-1][0]] == first[name]:
                groups[-1].append(name)
            else:
                groups.append([name])
        unreached = [n for n in targets if n not in first]
        if unreached:
            raise ValueError(f"quantize(method=gptq): the calibration data never reaches {unreached[:3]}; "
                             "give inputs that run every layer, or skip those layers")
        return groups

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
