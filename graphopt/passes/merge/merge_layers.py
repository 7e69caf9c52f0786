"""``merge_layers``: fewer, larger layers. Exact merges first, then (``latency=``) LayerMerge.

1. BatchNorm is folded into the layer before it (the ``fold_bn`` pass).
2. Exact merges, repeated until none is left: a conv/linear layer whose output goes only to another
   of the same kind with nothing between becomes one layer (:mod:`.layer_math`), when that does not
   cost more multiply-adds; a module whose forward is ``x + layer(x)`` becomes the layer with the
   identity added. The merged layer takes the first one's place, the second becomes ``nn.Identity``.
3. With ``latency=0.7``: LayerMerge (Kim et al. 2024, "LayerMerge: Neural Network Depth Compression
   through Layer Pruning and Merging"). Chains of layers joined by activation modules are cut into
   segments; the activations inside a segment are removed and its layers merged. A dynamic program
   picks the segments whose predicted latency (a table of layers measured on this device,
   :mod:`graphopt.infra.latency_table`) meets ``latency`` x the model's measured latency with the least
   importance lost (each segment's output error on calibration data, measured alone).

Every layer pair left alone gets a diagnostic with the reason.
"""

from __future__ import annotations

import copy
import logging
from typing import Annotated, Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.registry import get_pass, register_pass

from .dp import choose_segments
from .layer_math import add_identity, macs, merge_pair, why_no_identity, why_not_mergeable
from .links import GraphLinks

log = logging.getLogger(__name__)

MAX_ROUNDS = 64


@register_pass("merge_layers", change="depth", stage=40, choices=({},))
class MergeLayers(Pass):
    """Merge consecutive linear layers exactly; with latency=, remove activations by LayerMerge's DP."""

    decisive = ("latency",)

    latency: Annotated[float, Range(0, 1, lo_open=True)] | None = None  # target latency / measured latency
    fold_bn: bool = True  # fold BatchNorm into the layers first
    costlier: bool = False  # exact merges even where the merged layer has more multiply-adds
    calib_batches: Annotated[int, Range(1)] = 4  # LayerMerge: batches that measure each segment's importance
    cost: Literal["measured", "macs"] = "measured"  # LayerMerge: latency table measured here, or multiply-adds

    @property
    def tolerance(self) -> float | None:  # type: ignore[override]
        return None if self.latency is not None else 1e-5

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.latency is not None

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        if self.fold_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in program.module.modules()):
            folded = get_pass("fold_bn")().run(program, am)
            result.diagnostics += folded.diagnostics
            result.stats["bn_folded"] = folded.stats.get("folded", 0)
            program.analyses.clear()
        merged = self._exact(program, result)
        result.stats["layers_merged"] = merged
        if self.latency is not None:
            choose_segments(program, self.latency, self.calib_batches, result, self._exact, self.cost)
        result.modified = bool(merged or result.stats.get("bn_folded") or result.stats.get("activations_removed"))
        if not result.modified and not any(d.level in ("skipped", "warning") for d in result.diagnostics):
            result.note("", "nothing to merge: no BatchNorm, and no two linear layers (conv, linear) run one "
                            "after the other without a nonlinearity or a norm between them")
        return result

    def _exact(self, program: Program, result: PassResult, quiet: bool = False) -> int:
        """Merge direct pairs and residual modules until none is left; returns the layers removed."""
        removed = 0
        refused: dict[tuple[str, str], str] = {}
        for _ in range(MAX_ROUNDS):
            links = GraphLinks(program.analyses.get("exported"), program.module)
            done = self._merge_pairs(program, links, refused) + self._merge_residuals(program, links, refused)
            program.analyses.clear()
            if not done:
                break
            removed += done
        if not quiet:
            for (a, b), why in refused.items():
                result.skip(f"{a} -> {b}" if b else a, why)
        return removed

    def _merge_pairs(self, program: Program, links: GraphLinks, refused: dict[tuple[str, str], str]) -> int:
        used: set[str] = set()
        done = 0
        for link in links.links:
            if link.act is not None or link.a in used or link.b in used:
                continue
            a, b = program.get_submodule(link.a), program.get_submodule(link.b)
            why = why_not_mergeable(a, b)
            merged = merge_pair(a, b) if why is None else None
            if merged is not None and not self.costlier:
                before, after = macs(a, link.shape_a) + macs(b, link.shape_b), macs(merged, link.shape_a)
                if after > before:
                    why = f"the merged layer costs more multiply-adds ({after:,} vs {before:,}; costlier=true merges it)"
            if why is None and not _same_output(a, b, merged, link.shape_a):
                why = "the merged layer does not reproduce the pair on a random input (numerical check)"
            if why is not None:
                refused[(link.a, link.b)] = why
                continue
            program.replace_module(link.a, merged)
            program.replace_module(link.b, nn.Identity())
            used |= {link.a, link.b}
            refused.pop((link.a, link.b), None)
            done += 1
        return done

    def _merge_residuals(self, program: Program, links: GraphLinks, refused: dict[tuple[str, str], str]) -> int:
        done = 0
        for res in links.residuals:
            layer = program.get_submodule(res.layer)
            why = why_no_identity(layer, res.shape_in, res.shape_out)
            if why is not None:
                refused[(res.module, "")] = f"residual x + {res.layer}(x) kept: {why}"
                continue
            new = copy.deepcopy(layer)
            add_identity(new)
            program.replace_module(res.module, new)
            done += 1
        return done


def _same_output(a: nn.Module, b: nn.Module, merged: nn.Module, shape: tuple[int, ...]) -> bool:
    if not shape:
        return True
    x = torch.randn(*shape, dtype=a.weight.dtype, device=a.weight.device)
    with torch.no_grad():
        ref, got = b(a(x)), merged(x)
    return ref.shape == got.shape and float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max().clamp_min(1e-6))
