"""Exact clean-ups: eval-mode Dropout is the identity, so swap it for ``nn.Identity``."""

from __future__ import annotations

import fnmatch

from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.pass_infra import Pass, PassResult, register_pass
from graphopt.program import Program

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@register_pass("remove_dropout")
class RemoveDropout(Pass):
    """Replace Dropout modules (identities in eval mode) with nn.Identity."""

    where: str = "*"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        targets = [n for n, m in program.named_modules()
                   if isinstance(m, _DROPOUTS) and fnmatch.fnmatchcase(n, self.where)]
        for name in targets:
            program.replace_module(name, nn.Identity())
        result.modified = bool(targets)
        result.stats["removed"] = len(targets)
        if program.module.training:
            result.note("", "model is in training mode; dropout removal assumes eval-mode semantics", "warning")
        return result
