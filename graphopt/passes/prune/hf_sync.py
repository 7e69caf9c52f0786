"""Keep a HuggingFace model's config describing the model after a structural pass.

After a pass changes tensor sizes, :func:`sync_hf_config` searches the config changes under which
``type(model)(config)`` rebuilds the model (:func:`graphopt.analysis.hf_config.fit_config`), checks
them the way plain ``from_pretrained`` would use them (build, load the weights, compare outputs),
and records them as ``set_config`` edits. When no config describes the model (per-layer sizes that
differ, heads whose size the config derives from the hidden size), the config is left alone and the
pass says why; ``save_pretrained`` then refuses with the way out (see :mod:`graphopt.emit.hf`).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import numpy as np

from graphopt.analysis.depgraph import Group
from graphopt.analysis.hf_config import (
    ConfigFit,
    fit_config,
    is_hf_model,
    numeric_attrs,
    reload_mismatch,
    structure_mismatches,
    summarize,
    with_changes,
)
from graphopt.infra.contract import PassResult
from graphopt.infra.program import Program

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.\d+(?=\.)")  # layers.3.mlp -> layers.*.mlp


def sync_hf_config(program: Program, attrs_before: dict[str, float], result: PassResult) -> bool:
    """Record the config changes that describe ``program.module`` now; ``False`` when none does."""
    model = program.module
    if not is_hf_model(model):
        return True
    after = numeric_attrs(model)
    changed = {k for k, v in after.items() if attrs_before.get(k, v) != v}
    try:
        fit = fit_config(model, changed_attrs=changed)
    except Exception as e:  # noqa: BLE001 - the search must never cost the user the pruned model
        log.debug("config search failed", exc_info=True)
        result.note("<config>", f"the HF config was not updated: the config search failed ({type(e).__name__}: "
                    f"{e}); save with go.save / go.load", "warning")
        return False
    # (the same list save_pretrained's refusal gives, so the two messages count the same problems)
    problem = summarize(structure_mismatches(model, attributes=False), 1) if not fit.ok else None
    if problem is None and fit.changes:
        problem = reload_mismatch(model, with_changes(model.config, fit.changes), program.example_inputs)
    if problem is not None:
        result.note("<config>", f"the HF config cannot describe the rewritten model ({problem}); save_pretrained "
                    "will refuse it: save with go.save / go.load, or prune with reloadable=true", "info")
        return False
    for key, value in fit.changes.items():
        program.set_config(key, value)
    if fit.changes:
        result.note("<config>", f"config updated so that save_pretrained + from_pretrained rebuild the model: "
                    f"{fit.describe()}", "info")
    return True


# --- which groups a config can describe (prune(reloadable=true)) -----------------------------------------

def group_kind(group: Group) -> tuple:
    """Groups that play the same part in every layer share a kind (``layers.*.mlp.up_proj.weight:0``, ...)."""
    members = sorted({f"{_LAYER_INDEX.sub('.*', m.fqn)}:{m.dim}" for m in group.members})
    return group.unit, group.units, tuple(members)


def planned_shapes(program: Program, groups: list[Group], keep: dict[int, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes the model would have after keeping ``keep`` units of ``groups``."""
    shapes = {k: list(v.shape) for k, v in program.module.state_dict(keep_vars=True).items()}
    masks: dict[tuple[str, int], np.ndarray] = {}
    for g in groups:
        for m in g.members:
            if m.fqn not in shapes:
                continue
            mask = masks.setdefault((m.fqn, m.dim), np.ones(shapes[m.fqn][m.dim], dtype=bool))
            mask &= (m.positions < 0) | np.isin(m.positions, keep[g.id])
    for (fqn, dim), mask in masks.items():
        shapes[fqn][dim] = int(mask.sum())
    for alias, target in _tied_names(program).items():
        shapes[alias] = shapes[target]
    return {k: tuple(v) for k, v in shapes.items()}


def _tied_names(program: Program) -> dict[str, str]:
    named = program.module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    out = {}
    for name, t in named.items():
        if id(t) in first:
            out[name] = first[id(t)]
        else:
            first[id(t)] = name
    return out


def describable_groups(program: Program, groups: list[Group], result: PassResult) -> list[Group]:
    """The groups whose pruning the model's HF config can describe; the others are reported and left whole.

    Each kind of group is probed on its own: one unit fewer in every group of the kind, and a config
    search on the shapes that would give (nothing is changed).
    """
    if not is_hf_model(program.module):
        result.note("", "reloadable=true: not a HuggingFace model, so only the same count per layer is kept", "info")
        return groups
    kinds: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        kinds[group_kind(g)].append(g)
    families: dict[tuple[str, int], list[tuple]] = defaultdict(list)  # kinds that one config field may govern
    for kind in kinds:
        families[kind[:2]].append(kind)
    kept: list[Group] = []
    for (unit, units), family in families.items():
        if units < 2:
            for kind in family:
                result.skip(kinds[kind][0].modules[0], f"{len(kinds[kind])} group(s) of 1 {unit}: nothing to remove")
            continue
        together = [g for kind in family for g in kinds[kind]]
        if len(family) > 1 and _probe(program, together, units).ok:
            kept += together  # e.g. T5's encoder and decoder heads: one num_heads for both
            continue
        for kind in family:
            fit = _probe(program, kinds[kind], units)
            if fit.ok:
                kept += kinds[kind]
            else:
                result.skip(kinds[kind][0].modules[0], f"{len(kinds[kind])} {unit} group(s) like this one are kept "
                            f"whole: the HF config cannot describe pruning them ({summarize(fit.mismatches, 2)})")
    return kept


def _probe(program: Program, groups: list[Group], units: int) -> ConfigFit:
    """The config search for the model with one unit fewer in each of ``groups`` (nothing is changed)."""
    probe = {g.id: np.arange(units - 1) for g in groups}
    return fit_config(program.module, planned_shapes(program, groups, probe))
