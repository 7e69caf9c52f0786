"""Applying a pruning plan: resize every member of the chosen groups, then the attributes that hold sizes.

Layer size attributes (``in_features``, ``out_channels``, ...) follow their tensors' shapes; sizes baked
into the graph as constants (view/split sizes) are traced to the module attributes they came from;
head counts (``num_heads``, ``num_key_value_heads``) follow the heads kept. Used by :mod:`.prune`
and by :func:`apply_plan` for plans made by hand.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from graphopt.analysis.depgraph import DependencyGraph, Group
from graphopt.infra.contract import PassResult
from graphopt.infra.program import Program

from .check import structure_error

log = logging.getLogger(__name__)


def apply_plan(program: Program, keep: dict[int, list[int] | np.ndarray], *, outputs: bool = False) -> PassResult:
    """Prune by an explicit plan: ``{group id: units to keep}`` over ``program.dependency_graph``.

    For users who rank units themselves; groups not named are left whole.
    """
    graph: DependencyGraph = program.analyses.get("dependency_graph_outputs" if outputs else "dependency_graph")
    by_id = {g.id: g for g in graph.groups}
    unknown = sorted(set(keep) - set(by_id))
    if unknown:
        raise KeyError(f"no prunable group with id {unknown}; the graph has {len(by_id)} groups")
    plan = {gid: np.sort(np.asarray(units, dtype=np.int64)) for gid, units in keep.items()}
    for gid, units in plan.items():
        if len(units) == 0 or units.min() < 0 or units.max() >= by_id[gid].units:
            raise ValueError(f"group {gid} has {by_id[gid].units} units; cannot keep {units.tolist()}")
    result = PassResult(modified=True)
    before = program.analyses.get("exported")
    snapshot = program.snapshot()
    groups = [by_id[gid] for gid in plan]
    apply_keep(program, groups, plan, result, fixed_sizes(graph, groups))
    error = run_error(program)
    if error:
        program.restore(snapshot)
        raise RuntimeError(f"the model does not run with this plan (restored): {error}")
    error = structure_error(program, before)
    if error:
        program.restore(snapshot)
        raise RuntimeError(f"with this plan the model computes something else, not a smaller version "
                           f"(restored): {error}")
    program.analyses.clear()
    return result


def run_error(program: Program) -> str:
    """'' if the model runs on its example inputs, else the error."""
    try:
        program.run()
    except Exception as e:  # any failure means the structure is inconsistent
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def fixed_sizes(graph: DependencyGraph, changed: list[Group]) -> set[tuple[str, int]]:
    """(module, size) pairs of view/split sizes that stay as they are: on frozen dims or unpruned groups."""
    ids = {g.id for g in changed}
    return graph.fixed_constants | {(c.module, c.value) for g in graph.groups if g.id not in ids
                                    for c in g.constants}


def apply_keep(program: Program, groups: list[Group], keep: dict[int, np.ndarray], result: PassResult,
               fixed: set[tuple[str, int]] = frozenset()) -> set[int]:  # type: ignore[assignment]
    """Resize every member and the attributes that hold sizes; return groups with unbacked sizes.

    ``fixed``: sizes used elsewhere in the same module that do not change (an attribute holding one
    of those must keep its value).
    """
    masks = kept_masks(program, groups, keep)
    old_shapes: dict[str, tuple[int, ...]] = {}
    for (fqn, dim), mask in masks.items():
        old_shapes.setdefault(fqn, tuple(program.tensor(fqn).shape))
        for alias in program.aliases(fqn):
            old_shapes.setdefault(alias, old_shapes[fqn])
        program.resize(fqn, dim, np.nonzero(mask)[0])
    size_changes = _size_changes(groups, keep)
    suspects = _sync_constants(program, groups, keep, result, fixed)  # before leaf modules change attributes
    for module_name in sorted({fqn.rpartition(".")[0] for fqn in old_shapes}):
        _sync_leaf_module(program, module_name, old_shapes, result)
    _sync_head_attributes(program, groups, keep, size_changes, result)
    for g in groups:
        result.note(g.modules[0], f"group {g.id}: {g.units} -> {len(keep[g.id])} {g.unit}s "
                    f"({len(g.members)} members)", "info")
    return suspects


def kept_masks(program: Program, groups: list[Group], keep: dict[int, np.ndarray]
               ) -> dict[tuple[str, int], np.ndarray]:
    """``(tensor, dim) -> mask`` of the indices kept along that dim when ``groups`` keep the units ``keep`` (a
    tensor in several groups keeps what all of them keep; tied tensors appear once, under their first name). The
    masks are over the sizes before the cut, so they can be computed after it too."""
    masks: dict[tuple[str, int], np.ndarray] = {}
    canonical: dict[int, str] = {}
    for g in groups:
        for m in g.members:
            tensor = program.tensor(m.fqn)
            fqn = canonical.setdefault(id(tensor), m.fqn)
            mask = masks.setdefault((fqn, m.dim), np.ones(len(m.positions), dtype=bool))
            mask &= (m.positions < 0) | np.isin(m.positions, keep[g.id])
    return masks


def _size_changes(groups: list[Group], keep: dict[int, np.ndarray]) -> dict[int, int]:
    """old size -> new size for every member dim and head space touched by one group only."""
    out: dict[int, int] = {}
    for g in groups:
        for m in g.members:
            new = int(((m.positions < 0) | np.isin(m.positions, keep[g.id])).sum())
            out.setdefault(len(m.positions), new)
    return out


#: Size attributes of layers, by class name: attribute -> (tensor, dim) it must equal.
SIZE_ATTRS: dict[str, dict[str, tuple[str, int]]] = {
    "Linear": {"in_features": ("weight", 1), "out_features": ("weight", 0)},
    "Embedding": {"embedding_dim": ("weight", 1), "num_embeddings": ("weight", 0)},
    "Conv1D": {"nx": ("weight", 0), "nf": ("weight", 1)},  # transformers' GPT-2 style linear layer
}


def register_size_attrs(class_name: str, attrs: dict[str, tuple[str, int]]) -> None:
    """Tell ``prune`` which attributes of a layer class hold which tensor's size along which dim."""
    SIZE_ATTRS[class_name] = dict(attrs)


def _is_known_layer(module: nn.Module) -> bool:
    return type(module).__name__ in SIZE_ATTRS or isinstance(
        module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm))


def _sync_leaf_module(program: Program, name: str, old_shapes: dict[str, tuple[int, ...]],
                      result: PassResult) -> None:
    """Update size attributes of a module whose parameters were resized."""
    module = program.get_submodule(name)
    w = getattr(module, "weight", None)
    if type(module).__name__ in SIZE_ATTRS:
        for attr, (tensor, dim) in SIZE_ATTRS[type(module).__name__].items():
            t = getattr(module, tensor, None)
            if hasattr(module, attr) and isinstance(t, torch.Tensor):
                _set(program, name, attr, int(t.shape[dim]))
    elif isinstance(module, nn.modules.conv._ConvNd):
        old_w = old_shapes.get(f"{name}.weight", tuple(w.shape))
        groups = module.groups
        if groups > 1:  # whole groups were removed: the per-group widths are unchanged
            groups = groups * int(w.shape[0]) // int(old_w[0])
            _set(program, name, "groups", groups)
        if module.transposed:  # weight: [in, out / groups, *kernel]
            _set(program, name, "in_channels", int(w.shape[0]))
            _set(program, name, "out_channels", int(w.shape[1]) * groups)
        else:  # weight: [out, in / groups, *kernel]
            _set(program, name, "out_channels", int(w.shape[0]))
            _set(program, name, "in_channels", int(w.shape[1]) * groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = module.running_mean if module.running_mean is not None else w
        _set(program, name, "num_features", int(ref.shape[0]))
    elif isinstance(module, nn.LayerNorm):
        _set(program, name, "normalized_shape", list(w.shape) if w is not None else module.normalized_shape)
    elif any(isinstance(v, int) and not isinstance(v, bool) for v in vars(module).values()):
        result.note(name, f"{type(module).__name__}: size attributes are updated only where the graph uses "
                    f"them (view/split sizes); others may be stale")


def _set(program: Program, module: str, attr: str, value: object) -> None:
    current = getattr(program.get_submodule(module), attr)
    if isinstance(current, tuple):
        value = tuple(value) if isinstance(value, list) else value
        if current == value:
            return
        program.set_attr(module, attr, list(value))
        setattr(program.get_submodule(module), attr, tuple(value))
        return
    if current != value:
        program.set_attr(module, attr, value)


def _sync_constants(program: Program, groups: list[Group], keep: dict[int, np.ndarray],
                    result: PassResult, fixed: set[tuple[str, int]]) -> set[int]:
    """Sizes baked into view/split/expand calls come from module attributes: update those.

    Returns the groups whose sizes appear as constants no attribute holds (computed from tensor
    shapes, or literals: only running the model tells).
    """
    changes: dict[str, dict[int, set[int]]] = {}
    ops: dict[tuple[str, int], str] = {}
    owners: dict[tuple[str, int], set[int]] = {}
    suspects: set[int] = set()
    for g in groups:
        for c in g.constants:
            new = int(((c.positions < 0) | np.isin(c.positions, keep[g.id])).sum())
            if new != c.value and c.from_inputs:
                suspects.add(g.id)  # only running the model tells whether the code recomputes it
            elif new != c.value:
                changes.setdefault(c.module, {}).setdefault(c.value, set()).add(new)
                ops[(c.module, c.value)] = c.op
                owners.setdefault((c.module, c.value), set()).add(g.id)
    for module_name, old_to_new in changes.items():
        module = program.get_submodule(module_name) if module_name else program.module
        if _is_known_layer(module):
            continue  # its size attributes follow its tensors' shapes (_sync_leaf_module)
        originals = {a: v for a, v in vars(module).items() if not a.startswith("_") and type(v) is int}
        for old, news in sorted(old_to_new.items()):
            where, op = module_name or "<root>", ops[(module_name, old)]
            if len(news) > 1 or (module_name, old) in fixed:
                becomes = sorted(news | ({old} if (module_name, old) in fixed else set()))
                result.note(where, f"{op} size {old} becomes {becomes} in different places; "
                            f"attributes left alone", "warning")
                suspects |= owners[(module_name, old)]
                continue
            new = news.pop()
            attrs = [a for a, v in originals.items() if v == old]
            for a in attrs:
                program.set_attr(module_name, a, new)
            if attrs:
                result.note(where, f"{op} size {old} -> {new}: updated {', '.join(attrs)}")
            else:
                result.note(where, f"{op} size {old} -> {new}: no attribute holds it; assuming it is "
                            f"computed from tensor shapes")
                suspects |= owners[(module_name, old)]
    return suspects


def _sync_head_attributes(program: Program, groups: list[Group], keep: dict[int, np.ndarray],
                          size_changes: dict[int, int], result: PassResult) -> None:
    """Head counts (``num_heads``, ``num_key_value_heads``) and packed widths (``all_head_size``).

    Query-head counts come from the attention op's head dims; key/value-head counts from the units
    of a "kv-head group" group (the kv heads may be broadcast before attention, as in Falcon).
    """
    heads: dict[str, dict[int, int]] = {}
    kv_heads: dict[str, dict[int, int]] = {}
    for g in groups:
        for module_name, pos in g.head_spaces:
            new = int(((pos < 0) | np.isin(pos, keep[g.id])).sum())
            if new != len(pos):
                heads.setdefault(module_name, {})[len(pos)] = new
                if g.unit == "kv-head group":
                    kv_heads.setdefault(module_name, {})[g.units] = len(keep[g.id])
    widths = {o: n for o, n in size_changes.items() if o != n}
    for module_name, old_to_new in heads.items():
        module = program.get_submodule(module_name) if module_name else program.module
        kv = kv_heads.get(module_name, {})
        for attr, value in list(vars(module).items()):  # decide from the original values, then set
            if attr.startswith("_") or type(value) is not int:
                continue
            low = attr.lower()
            if "head" in low and "dim" not in low and "size" not in low:
                mapping = kv if ("kv" in low or "key_value" in low) else old_to_new
                if value in mapping:
                    program.set_attr(module_name, attr, mapping[value])
            elif low in ("all_head_size", "inner_dim") and value in widths:
                program.set_attr(module_name, attr, widths[value])
