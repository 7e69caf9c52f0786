"""Progressive healing: make a lossy change one unit at a time, with a short ``heal`` after each unit.

A lossy pass that accepts ``progressive=N`` splits its work into units (a block's norms for ``dyt``,
a round of pruning for ``prune``, a block's layers for ``quantize``) and calls
:func:`heal_each` with one function per unit. After each unit the model is healed for ``N`` steps
with heal's recipe for that kind of change (end-to-end, no block-wise stage), so the later units
start from a model that has already adapted to the earlier ones ("Transformers Don't Need
LayerNorm at Inference Time", Baroni et al. 2025, remove norms gradually; iterative pruning with
fine-tuning between rounds, Han et al. 2015). The pass itself needs the original model as teacher
and calibration data, like ``heal``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from graphopt.analysis import AnalysisManager

from .contract import Diagnostic, PassResult
from .program import Program
from .registry import get_pass

log = logging.getLogger(__name__)

Unit = tuple[str, Callable[[], PassResult]]  # (label, make this unit's change)


def heal_each(program: Program, am: AnalysisManager, units: Sequence[Unit], *, steps: int, kind: str,
              seed: int = 0, averaged: Sequence[str] = ()) -> PassResult:
    """Run each unit, then ``steps`` steps of ``heal(recipe=kind)``; one result for all of them.

    Unit results' diagnostics are kept with the unit's label in front of their message; the heal
    after each unit adds one line with its held-out loss before and after. Numeric stats are summed
    over the units, except those in ``averaged`` (means over the units that report them).
    """
    if program.original is None or program.calib is None:
        raise ValueError("progressive healing needs the original model as teacher and calibration data: run "
                         "the pass through graphopt.optimize(..., calib=...)")
    total = PassResult(modified=False)
    healed = 0
    counts: dict[str, int] = {}
    for k, (label, make) in enumerate(units):
        result = make()
        am.invalidate()
        total.diagnostics += [Diagnostic(d.target, f"[{label}] {d.message}", d.level) for d in result.diagnostics]
        for key, value in result.stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total.stats[key] = total.stats.get(key, 0) + value
                counts[key] = counts.get(key, 0) + 1
        if not result.modified:
            continue
        total.modified = True
        total.changes_outputs |= result.changes_outputs
        heal = get_pass("heal")(recipe=kind, steps=steps, blockwise=0, seed=seed + k, progress=False)
        healing = heal.run(program, am)
        am.invalidate()
        healed += int(healing.stats.get("steps", 0))
        before, after = healing.stats.get("loss_before", float("nan")), healing.stats.get("loss_after", float("nan"))
        total.note(label, f"healed {int(healing.stats.get('steps', 0))} steps: held-out loss {before:.4g} -> "
                          f"{after:.4g}")
        log.info("progressive %s: held-out loss %.4g -> %.4g", label, before, after)
    for key in averaged:
        if key in total.stats:
            total.stats[key] /= max(1, counts.get(key, 1))
    total.stats.update(progressive_units=len(units), progressive_heal_steps=healed)
    return total
