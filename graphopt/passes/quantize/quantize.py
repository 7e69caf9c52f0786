"""quantize: int8 / int4 / ternary weights, or w8a8 (int8 weights and activations), of Linear and Conv2d layers.

Every ``nn.Linear`` and HuggingFace ``Conv1D`` (GPT-2's transposed linear) in scope becomes a
:class:`graphopt.nn.quant.QuantLinear` holding packed codes and per-channel or per-group scales; every
``nn.Conv2d`` a weight-only :class:`graphopt.nn.quant.QuantConv2d` (each output channel's ``in x kh x kw``
weights are one row of codes; w8a8 and GPTQ apply to Linear layers, convolutions under them are noted).
Left alone, each with a diagnostic: the vocabulary projection (the LM head: HF's output embeddings,
or a layer tied to an embedding table; the most sensitive layer; ``lm_head=true`` quantizes it),
embedding tables (``embeddings=true`` packs them as int8 / int4 rows), layers outside ``where`` or
inside ``skip``, and non-float weights.

- ``method=gptq`` rounds with the inputs' Hessian (:mod:`.gptq`), one group of layers at a time in
  forward order, on the activations of the already-quantized model, one block at a time
  (:mod:`.sequential`).
- ``bias_correction=true`` (round to nearest): the mean shift each layer's rounding gives its outputs on the
  calibration data is subtracted from its bias (:mod:`.bias_correction`); what makes int8 CNNs with
  depthwise convolutions and BatchNorm keep their predictions.
- ``budget_bits=4.5`` (with ``scheme=int4``): mixed precision, the most sensitive layers kept at int8
  so that the average bits per weight meet the budget (:mod:`.plan`).
- ``scheme=w8a8``: int8 weights per channel (7-bit codes, see ``W8A8_QMAX``) and int8 activations
  quantized at run time, one scale per tensor (onnxruntime's ``DynamicQuantizeLinear``) or per token
  (``activations=per_token``); ``alpha`` migrates activation outliers into the weights first
  (SmoothQuant, :mod:`.smoothquant`); unset, it is chosen per group of layers, ``alpha=0`` is off.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
from collections.abc import Callable, Collection
from dataclasses import field
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.analysis.calibration import layer_input_stats
from graphopt.analysis.layers import linear_weight, output_embeddings, tied_tables, weight_rows, why_not_plain
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.progressive import heal_each
from graphopt.infra.registry import register_pass
from graphopt.nn.quant import BACKENDS, PackedLayer, QuantConv2d, QuantEmbedding, QuantLinear, weight_scales
from graphopt.progress import track
from graphopt.units import MIB

from . import per_layer
from .algorithms import LayerGroup, QuantAlgorithm, RoundToNearest, SmoothQuant, qmax_of, rounding
from .bias_correction import output_shifts, subtract_from_bias
from .block_local import restricted_outside, restricted_to_block
from .plan import (
    LayerPlan,
    LayerScheme,
    gradient_sensitivity,
    layer_sensitivity,
    mixed_precision,
    plan_layers,
    weight_matrix,
)
from .sequential import sequential_by_block
from .smoothquant import fold_factor, fold_plan
from .tables import SHAREABLE, share_tied_table, why_not_table

log = logging.getLogger(__name__)


def _scales_underflow(weight: torch.Tensor, plan: LayerPlan) -> bool:
    """Whether the layer's scales, stored in the weight's dtype, would be subnormal (fp16 weights of ~1e-5)."""
    if weight.dtype not in (torch.float16,):
        return False
    scales = weight_scales(weight.detach().float(), plan.scheme, plan.group_size, qmax_of(plan))
    return bool((scales < torch.finfo(weight.dtype).tiny).any())


@register_pass("quantize", tolerance=None, change="quantize", stage=90,
               choices=({"scheme": "int8"}, {"scheme": "w8a8", "method": "gptq"},
                        {"scheme": "int4", "method": "gptq", "budget_bits": 6}, {"scheme": "int4", "method": "gptq"},
                        {"scheme": "int8", "lm_head": True},
                        {"scheme": "int4", "method": "gptq", "budget_bits": 6, "lm_head": True},
                        {"scheme": "int4", "method": "gptq", "lm_head": True}))
class Quantize(Pass):
    """Quantize Linear and Conv2d weights to int8 / int4 / ternary, or Linear weights and activations to int8 (w8a8)."""

    decisive = ("scheme", "method", "group_size")
    per_layer = ("layers", "scheme", "method")  # the search's per-layer plans set layers={...} (per_layer.py)
    layer_unchanged = "float"

    scheme: Literal["int8", "int4", "ternary", "w8a8"] = "int8"  # weight format (w8a8: int8 activations too)
    group_size: Annotated[int, Range(0)] | None = None  # None: int4 the largest of 128/64/32 dividing each width; else per channel
    method: Literal["rtn", "gptq"] = "rtn"  # round to nearest, or GPTQ (needs calibration)
    where: str = "*"  # glob on the names of the layers quantized
    skip: list[str] = field(default_factory=list)  # globs of module names left in float
    #: per-layer schemes, glob -> int8 | int4[/g<N>] | ternary[/g<N>] | w8a8[/per_token] | float (the last
    #: matching glob wins; the other layers take scheme / group_size / activations)
    layers: dict[str, str] = field(default_factory=dict)
    lm_head: bool = False  # quantize the output projection too (kept in float by default)
    embeddings: bool = False  # pack embedding tables too (int4 rows in groups for int4, int8 rows otherwise)
    budget_bits: float | None = None  # mixed precision: average bits per weight, int8 for the most sensitive
    sensitivity: Literal["gradient", "measured"] = "gradient"  # budget_bits: rank layers by a probed gradient (one backward per batch) or by measuring each layer alone rounded (a forward per layer)
    alpha: Annotated[float, Range(0, 1)] | None = None  # w8a8: SmoothQuant migration strength; None: chosen per layer group; 0: off
    activations: Literal["per_tensor", "per_token"] | None = None  # w8a8: one activation scale per tensor (None: this, onnxruntime's) or per token
    uneven_groups: Literal["error", "short", "per_channel"] = "error"  # a group size that does not divide
    backend: Literal["auto", "torch", "int_mm", "onednn", "int8_mm", "triton"] = "auto"  # layers' kernel (auto: measured)
    damp: Annotated[float, Range(0, 1, hi_open=True)] = 0.01  # GPTQ: added to the Hessian's diagonal, as a fraction of its mean
    act_order: bool = True  # GPTQ: columns with the largest Hessian diagonal first (measured better on MiniLM)
    calib_batches: Annotated[int, Range(1)] = 32  # calibration batches read (per group of layers for GPTQ)
    by_block: bool = True  # GPTQ: one transformer block at a time (false: a forward of the model per group)
    progressive: Annotated[int, Range(0)] = 0  # heal steps after each block is quantized (0: all at once, no heal)
    bias_correction: bool = False  # rtn: subtract each layer's mean output shift on calibration data from its bias

    renamed: ClassVar[dict[str, str]] = {
        "act_scales": "w8a8's activation mode is now activations=per_tensor|per_token (act_scales=token is "
                      "activations=per_token), the name QuantLinear and the kernels use"}

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        smoothing = self._any_w8a8() and (self.alpha is None or self.alpha > 0)
        return (self.method == "gptq" or self.budget_bits is not None or smoothing or self.progressive > 0
                or self.bias_correction)

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        return self.progressive > 0

    def moot(self, model: nn.Module) -> dict[str, str]:
        return {"lm_head": "the model has no vocabulary projection (LM head)"} \
            if self.lm_head and not output_embeddings(model) else {}

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        self._check_options(program)
        if self.progressive:
            result = heal_each(program, am, self._units(program, am), steps=self.progressive, kind="quantize")
            if result.stats.get("weights"):
                result.stats["bits_per_weight"] = round(8 * result.stats["weight_bytes"] / result.stats["weights"], 3)
            return result
        result = PassResult(modified=False)
        model = program.module
        targets, tables, tied = self._targets(model, result)
        names = [n for n, _ in model.named_modules()]
        for pattern in self.layers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                result.note("", f"layers: {pattern!r} matches no module name (names look like {names[-1]!r})",
                            "warning")
        if not targets and not tables:
            result.note("", "no layer was quantized (see the diagnostics for each one left alone)", "warning")
            return result
        weights = {n: weight_matrix(program.get_submodule(n)) for n in targets}
        shapes = {n: tuple(w.shape) for n, (w, _) in weights.items()}
        plans, notes = plan_layers(shapes, {n: self._chosen(n)[0] for n in shapes}, self.uneven_groups)
        for name, message in notes:
            result.note(name, message)
        for name in [n for n in targets if _scales_underflow(weights[n][0], plans[n])]:
            result.skip(name, f"its {plans[name].scheme} scales fall below {weights[name][0].dtype}'s normal range "
                              "(weights this small lose most of their precision in subnormal scales); it stays in "
                              "float (load the model in float32 to quantize it)")
            targets.remove(name)
            del weights[name], shapes[name], plans[name]
        if not targets and not tables:
            result.note("", "no layer was quantized (see the diagnostics for each one left alone)", "warning")
            return result
        if self.budget_bits is not None:
            plans = self._mixed(program, weights, plans, shapes, result)
        del weights  # each float weight is freed as its packed layer replaces it, not at the end of the pass
        w8a8 = [n for n in targets if plans[n].activations != "none"]
        smoothing = bool(w8a8) and (self.alpha is None or self.alpha > 0)
        groups = self._sequential_groups(am, w8a8) if smoothing else []
        smooth = self._transformed(program, SmoothQuant(self.alpha), groups, plans, result) if smoothing else {}
        folds = fold_plan(program, am, groups, smooth, plans, result) if smooth else {}
        sizes = {"before": 0, "after": 0, "weights": 0}
        algorithm = rounding(self.method, damp=self.damp, act_order=self.act_order)
        pending: dict[str, PackedLayer] = {}  # bias correction: built, replaced once their shifts are measured

        def quantize_group(names: list[str], stats: dict[str, Any], chosen: QuantAlgorithm = algorithm) -> None:
            group = self._group(program, names, plans, stats)
            group.smooth = [smooth.get(n) for n in names]
            result.diagnostics += chosen.apply(group)
            for name, weight, plan, s, codes in zip(names, group.weights, group.plans, group.smooth, group.codes):
                layer = self._packed(program, name, plan, codes, s)
                if self.bias_correction:
                    pending[name] = layer
                else:
                    program.replace_module(name, layer)
                sizes["before"] += weight.numel() * weight.element_size()
                sizes["after"] += layer.weight_bytes
                sizes["weights"] += weight.numel()

        convs = [n for n in targets if isinstance(program.get_submodule(n), nn.Conv2d)]
        if algorithm.sequential and convs:
            result.note(convs[0] if len(convs) == 1 else f"{convs[0]} (+{len(convs) - 1})",
                        f"{len(convs)} convolution(s) rounded to nearest: {algorithm.name} reads the inputs of "
                        "Linear layers (a convolution's would need unfolding into patches)", "warning")
            for name in convs:
                quantize_group([name], {}, RoundToNearest())
        if algorithm.sequential:
            batches = self._batches(program)
            linears = [n for n in targets if n not in convs]
            rest = sequential_by_block(model, linears, batches, algorithm.statistic, quantize_group,
                                       at=program.stream) if self.by_block else linears
            for names in track(self._sequential_groups(am, rest) if rest else [], f"quantize: {algorithm.name}",
                               unit="layer group"):
                quantize_group(names, layer_input_stats(model, {n: program.get_submodule(n) for n in names},
                                                        batches, algorithm.statistic))
        else:
            for name in targets:
                quantize_group([name], {})
        if pending:
            self._correct_biases(program, pending, result)
        shared = [t for t, head in tied.items() if share_tied_table(program, t, head, result)]
        before, after, n_weights = sizes["before"], sizes["after"], sizes["weights"]
        for consumer, producer in folds.items():
            fold_factor(program, consumer, producer, result)
        for name in tables:
            table = program.get_submodule(name)
            int4 = self.scheme == "int4"
            packed = QuantEmbedding.from_embedding(table, scheme="int4" if int4 else "int8",
                                                   group_size=(self.group_size or 128) if int4 else 0)
            program.replace_module(name, packed)
            before += table.weight.numel() * table.weight.element_size()
            after += packed.weight_bytes
            n_weights += table.weight.numel()
        result.modified = True
        result.stats.update({"layers": len(targets), "weight_mib_before": round(before / MIB, 4),
                             "weight_mib_after": round(after / MIB, 4),
                             "bits_per_weight": round(8 * after / n_weights, 3), "weights": n_weights,
                             "weight_bytes": after})
        if tables:
            result.stats["embedding_tables"] = len(tables)
        if shared:
            result.stats["tied_tables"] = len(shared)
        return result

    def layer_value(self) -> str | None:
        return per_layer.layer_value(self)

    def layer_units(self, program: Program) -> list[list[str]]:
        return per_layer.layer_units(self, program)

    def layer_variant(self, program: Program, name: str, value: str) -> nn.Module | None:
        return per_layer.layer_variant(self, program, name, value)

    def layer_error(self, program: Program, name: str, value: str) -> torch.Tensor | None:
        return per_layer.layer_error(self, program, name, value)

    def for_block(self, block: str) -> Quantize | str:
        return restricted_to_block(self, block)

    def outside_blocks(self, program: Program, blocks: list[str]) -> Quantize | str | None:
        outside = [t for t in self._targets(program.module, PassResult(modified=False))[0]
                   if not t.startswith(tuple(f"{b}." for b in blocks))]
        return restricted_outside(self, blocks, outside)

    # --- options and scope ----------------------------------------------------------------------------
    def _check_options(self, program: Program) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"quantize(backend={self.backend!r}): choose from {', '.join(BACKENDS)}")
        if self.budget_bits is not None and self.scheme != "int4":
            raise ValueError(f"quantize(budget_bits=...) mixes int4 and int8 layers; it needs scheme=int4, "
                             f"not {self.scheme}")
        if self.sensitivity != "gradient" and self.budget_bits is None:
            raise ValueError(f"quantize(sensitivity={self.sensitivity}) ranks layers for mixed precision; give "
                             "budget_bits= too (e.g. budget_bits=6)")
        if self.budget_bits is not None and not 4 <= self.budget_bits <= 8:
            raise ValueError(f"quantize(budget_bits={self.budget_bits:g}): the average bits of int4 / int8 layers lie "
                             "in [4, 8] (4: every layer int4, 8: every layer int8)")
        for pattern, text in self.layers.items():
            try:
                LayerScheme.parse(text)
            except ValueError as e:
                raise ValueError(f"quantize(layers={{{pattern}: {text}}}): {e}") from None
        if self.layers and self.budget_bits is not None:
            raise ValueError("quantize: budget_bits chooses every layer's scheme itself; give it or a layers map, not "
                             "both (the report of a budget_bits run gives its choice as a layers map)")
        if self.bias_correction and self.method != "rtn":
            raise ValueError(f"quantize(bias_correction=true) corrects round to nearest; method={self.method} "
                             "compensates its rounding error itself (drop bias_correction)")
        if self.alpha is not None and not self._any_w8a8():
            raise ValueError(f"quantize(alpha={self.alpha:g}) is SmoothQuant's strength, which moves activation "
                             f"outliers into w8a8's weights; scheme={self.scheme} keeps activations in float (drop alpha)")
        if self.activations is not None and not self._any_w8a8():
            raise ValueError(f"quantize(activations={self.activations}) sets how w8a8 scales its activations; "
                             f"scheme={self.scheme} keeps activations in float (use scheme=w8a8, or drop activations)")
        if program.device.type == "meta" and program.stream is None:
            raise ValueError("quantize needs real weights; the model is on the meta device (load its weights first)")

    def _units(self, program: Program, am: AnalysisManager) -> list[tuple[str, Callable[[], PassResult]]]:
        """progressive: each repeated block's layers in turn, then whatever else ``where`` selects."""
        if self.where != "*" or self.budget_bits is not None:
            raise ValueError("quantize(progressive=...) goes block by block over the whole model: it cannot be "
                             "combined with where= or budget_bits= (use skip= to keep layers in float)")
        blocks = [name for stack in am.get("blocks") for name in stack.names]
        if not blocks:
            raise ValueError("quantize(progressive=...) goes block by block: the model has no repeated blocks "
                             "(use quantize without progressive, then heal)")
        units = [(name, dataclasses.replace(self, progressive=0, where=f"{name}.*")) for name in blocks]
        units.append(("the rest", dataclasses.replace(self, progressive=0)))
        return [(label, functools.partial(step.run, program, am)) for label, step in units]

    def _targets(self, model: nn.Module, result: PassResult) -> tuple[list[str], list[str], dict[str, str]]:
        """The layers to pack, the embedding tables to pack, and the tied tables packed with their head."""
        heads = output_embeddings(model)
        heads |= {id(m.weight) for m in model.modules() if id(m) in heads and isinstance(m, nn.Module)
                  and isinstance(getattr(m, "weight", None), torch.Tensor)}  # and their weights (tied tables)
        ties = tied_tables(model) if self.lm_head else {}
        targets, tables, tied = [], [], {}
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
                 and not isinstance(m, nn.Conv2d) and fnmatch.fnmatchcase(n, self.where)]
        if convs:
            result.note(convs[0] if len(convs) == 1 else f"{convs[0]} (+{len(convs) - 1})",
                        f"{len(convs)} convolution layer(s) stay in float: quantize packs Conv2d, Linear and GPT-2's "
                        "Conv1D layers (not 1-d, 3-d or transposed convolutions)", "warning")
        for name, module in model.named_modules():
            if name in ties:  # packed with its head, which it reads (decided once the head is)
                tied[name] = ties[name]
                continue
            if isinstance(module, nn.Embedding):
                why = why_not_table(name, module, heads, embeddings=self.embeddings, lm_head=self.lm_head,
                                    where=self.where, skip=self.skip)
                if why:
                    result.skip(name, why)
                else:
                    tables.append(name)
                continue
            found = weight_matrix(module)
            if found is None or not name:
                continue
            why = self._why_not(name, module, found[0], heads, set(ties.values()))
            if why:
                result.skip(name, why)
            else:
                targets.append(name)
        for table in [t for t, head in tied.items() if head not in targets]:
            result.skip(table, f"tied to {tied.pop(table)}, which stays in float")
        return targets, tables, tied

    # --- per-layer quantization ---------------------------------------------------------------------
    def _packed(self, program: Program, name: str, plan: LayerPlan,
                codes: tuple[torch.Tensor, torch.Tensor] | None = None, smooth: torch.Tensor | None = None
                ) -> PackedLayer:
        """The packed layer that replaces ``name`` under ``plan``: its round-to-nearest codes, or ``codes``."""
        module = program.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            return QuantConv2d.from_conv(module, scheme=plan.scheme, group_size=plan.group_size, codes=codes)
        weight, bias = linear_weight(module)
        return QuantLinear.from_linear(weight, bias, scheme=plan.scheme, group_size=plan.group_size,
                                       backend=self.backend, codes=codes, activations=plan.activations, smooth=smooth)

    def _correct_biases(self, program: Program, layers: dict[str, PackedLayer], result: PassResult) -> None:
        """Measure each packed layer's mean output shift on the float model's inputs, subtract it from the
        layer's bias, then put the layers in (:mod:`.bias_correction`)."""
        shifts = output_shifts(program.module, {n: (program.get_submodule(n), q) for n, q in layers.items()},
                               self._batches(program))
        worst, worst_name = 0.0, ""
        for name, layer in layers.items():
            subtract_from_bias(layer, shifts[name])
            program.replace_module(name, layer)
            size = float(shifts[name].abs().max())
            if size > worst:
                worst, worst_name = size, name
        result.stats["bias_corrected"] = len(layers)
        result.note(worst_name or "", f"bias correction: {len(layers)} layers' biases moved by their mean output "
                                      f"shift on the calibration data (largest {worst:.3g}, in {worst_name})")

    def _mixed(self, program: Program, weights: dict, plans: dict[str, LayerPlan], shapes: dict,
               result: PassResult) -> dict[str, LayerPlan]:
        if self.sensitivity == "measured":
            scores = layer_sensitivity(program.module, list(weights), lambda n, plan: self._packed(program, n, plan),
                                       plans, self._batches(program)[:4])
        else:
            modules = {n: program.get_submodule(n) for n in weights}

            def error(n: str) -> torch.Tensor:
                rounded = self._packed(program, n, plans[n]).dequantized_weight(torch.float32).reshape(shapes[n])
                return weights[n][0].detach().float() - rounded

            scores = gradient_sensitivity(program.module, {n: m.weight for n, m in modules.items()}, error,
                                          lambda n, t: weight_rows(modules[n], t), self._batches(program)[:8])
        chosen, reached = mixed_precision(plans, shapes, scores, self.budget_bits)
        ranked = sorted(scores, key=scores.get, reverse=True)
        for rank, name in enumerate(ranked, 1):
            plan = chosen[name]
            bits = "int8 per channel" if plan.scheme == "int8" else f"{plan.scheme} g{plan.group_size}"
            result.note(name, f"{bits} (sensitivity {scores[name]:.2e}, rank {rank} of {len(ranked)})")
        result.stats["int8_layers"] = sum(p.scheme == "int8" for p in chosen.values())
        result.stats["planned_bits"] = round(reached, 3)
        same = dataclasses.replace(self, budget_bits=None, layers={n: "int8" for n in ranked if chosen[n].scheme == "int8"})
        result.note("", f"this plan as pipeline text, to reuse or edit: {same}")
        return chosen

    @staticmethod
    def _group(program: Program, names: list[str], plans: dict[str, LayerPlan], stats: dict[str, Any]
               ) -> LayerGroup:
        weights = [weight_matrix(program.get_submodule(n))[0] for n in names]
        return LayerGroup(names, weights, [plans[n] for n in names], [stats.get(n) for n in names])

    def _transformed(self, program: Program, algorithm: QuantAlgorithm, groups: list[list[str]],
                     plans: dict[str, LayerPlan], result: PassResult) -> dict[str, torch.Tensor]:
        """The input multiplier per layer that ``algorithm`` (SmoothQuant) chose for each group, from its
        statistic of the float model's inputs, read in one run over the calibration batches."""
        layers = {n: program.get_submodule(n) for g in groups for n in g}
        stats = layer_input_stats(program.module, layers, self._batches(program), algorithm.statistic)
        out = {}
        for names in groups:
            group = self._group(program, names, plans, stats)
            result.diagnostics += algorithm.apply(group)
            out.update({n: s for n, s in zip(names, group.smooth) if s is not None})
        return out

    def _batches(self, program: Program) -> list:
        return program.calib_batches(self.calib_batches)

    @staticmethod
    def _sequential_groups(am: AnalysisManager, targets: list[str]) -> list[list[str]]:
        """``targets`` in the order the forward reaches them, layers that read the same tensor together.

        GPTQ then quantizes one group at a time on the inputs the already-quantized layers produce.
        """
        groups, unreached = am.get("call_order").groups(targets)
        if unreached:
            raise ValueError(f"quantize: the example inputs never reach {unreached[:3]}; give inputs that run "
                             "every layer, or skip those layers")
        return groups

    def _any_w8a8(self) -> bool:
        return self.scheme == "w8a8" or any(str(v).split("/")[0] == "w8a8" for v in self.layers.values())

    def _chosen(self, name: str) -> tuple[LayerScheme, str | None]:
        """What layer ``name`` was given, and the ``layers`` glob that gave it (None: the pass's own options)."""
        pattern = next((g for g in reversed(self.layers) if fnmatch.fnmatchcase(name, g)), None)
        if pattern is not None:
            return LayerScheme.parse(self.layers[pattern]), pattern
        return LayerScheme(self.scheme, self.group_size, self.activations), None

    def _why_not(self, name: str, module: nn.Module, weight: torch.Tensor, heads: set[int],
                 tied_heads: Collection[str] = ()) -> str:
        if not fnmatch.fnmatchcase(name, self.where):
            return f"outside where={self.where!r}"
        chosen, pattern = self._chosen(name)
        if chosen.scheme == "float":
            return f"layers={{{pattern}: float}} keeps it in float"
        matched = next((g for g in self.skip if fnmatch.fnmatchcase(name, g)), None)
        if matched:
            return f"in skip ({matched!r})"
        if not weight.is_floating_point():
            return f"weight is {weight.dtype}, not floating point"
        plain = why_not_plain(module, nn.Linear if isinstance(module, nn.Linear) else
                              nn.Conv2d if isinstance(module, nn.Conv2d) else type(module))
        if plain:
            return plain
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                return f"a convolution padding with {module.padding_mode!r} (QuantConv2d pads with zeros)"
            if chosen.scheme == "w8a8":
                return ("a convolution: w8a8's integer kernels are Linear ones, so it stays in float (give it int8 "
                        f"weights with layers={{{name!r}: int8}}, or a glob)")
        if not self.lm_head and id(module) in heads:
            return ("the vocabulary projection (LM head): the most sensitive layer stays in float; "
                    "quantize(lm_head=true) quantizes it")
        if name in tied_heads and chosen.scheme not in SHAREABLE:
            return (f"tied to an embedding table, which reads int8 / int4 rows only: a {chosen.scheme} head would "
                    f"untie them (a float table and a packed copy, more bytes); give it layers={{{name!r}: int8}}")
        return ""

