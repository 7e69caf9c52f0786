"""Exact clean-ups: eval-mode Dropout is the identity, so swap it for ``nn.Identity``."""

from __future__ import annotations

import fnmatch

from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.analysis.hf_config import DROPOUTS
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass


@register_pass("remove_dropout")
class RemoveDropout(Pass):
    """Replace Dropout modules (identities in eval mode) with nn.Identity.

    The replacement keeps a ``p = 0.0`` attribute: models such as HuggingFace's read
    ``self.dropout.p`` in training mode to drop attention weights, and must keep working (without
    dropout) when trained after the pass. A HF model stays loadable by plain transformers: its config
    builds Dropout there again, which computes the same in eval mode.
    """

    where: str = "*"  # glob on the names of the Dropout layers removed

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        # Every name, so a Dropout registered under two names is removed under both.
        targets = [n for n, m in program.module.named_modules(remove_duplicate=False)
                   if isinstance(m, DROPOUTS) and fnmatch.fnmatchcase(n, self.where)]
        if "" in targets:
            targets.remove("")
            result.skip("", "the root module itself is a Dropout; there is nothing to replace it in")
        for name in targets:
            program.replace_module(name, nn.Identity())
            program.set_attr(name, "p", 0.0)
        if not targets:
            where = "" if self.where == "*" else f" matching {self.where!r}"
            result.note("", f"no Dropout layers{where} in the model: nothing to remove")
        result.modified = bool(targets)
        result.stats["removed"] = len(targets)
        if program.module.training:
            result.note("", "model is in training mode; dropout removal assumes eval-mode semantics", "warning")
        return result
