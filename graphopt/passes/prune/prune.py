"""Zero-configuration structural pruning over the dependency graph (DepGraph-class).

Each prunable :class:`~graphopt.analysis.depgraph.Group` is ranked by the sum of its members' importance
per unit (a channel, a head, a key/value-head group); the lowest units go, from every member at
once. Allocation is ``uniform`` (the same fraction of every group), ``global`` (one ranking across
groups after normalising each group's scores, in the spirit of LAMP, Lee et al. 2021) or ``knapsack`` (one
ranking of Taylor scores per parameter or FLOP a unit costs: the greedy solution of the knapsack that spends
the target where it loses least). Targets: a
fraction of units (``ratio``), of parameters kept (``target_params``) or of FLOPs kept
(``target_flops``, measured on the example inputs). Sizes held in module
attributes (``in_features``, ``num_heads``, view/split sizes baked into the graph) follow.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch

from graphopt.analysis import AnalysisManager
from graphopt.analysis.depgraph import DependencyGraph, Group
from graphopt.analysis.hf_config import numeric_attrs
from graphopt.analysis.probes import probe_gradients
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.metrics import count_flops
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.progressive import heal_each
from graphopt.infra.registry import register_pass

from .apply import SIZE_ATTRS, apply_keep, apply_plan, fixed_sizes, kept_masks, register_size_attrs, run_error
from .check import structure_error
from .hf_sync import describable_groups, sync_hf_config
from .reconstruct import apply_refits, input_grams, readers

__all__ = ["SIZE_ATTRS", "Plan", "Prune", "apply_plan", "register_size_attrs"]

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Units kept per group, and the resulting kept indices per (tensor, dim)."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)


#: the default rounding of what a channel group keeps, for groups of at least AUTO_ROUND_MIN_UNITS channels
AUTO_ROUND, AUTO_ROUND_MIN_UNITS = 8, 256


#: what a goal search tries, mildest first: 10/20/30% of the FLOPs on the example inputs (a fraction of units would
#: cut 3% of MiniLM's weights at 10%: its FFN channels are cheap), by weight norms in every group alike (no data
#: needed), and by Taylor importance per FLOP a unit costs with the readers refit (calibrated; docs/search.md)
SEARCHED = tuple({"target_flops": f} for f in (0.9, 0.8, 0.7)) + tuple(
    {"target_flops": f, "importance": "taylor", "allocation": "knapsack", "reconstruct": True} for f in (0.9, 0.8, 0.7))


@register_pass("prune", tolerance=None, change="prune", stage=20, choices=SEARCHED)
class Prune(Pass):
    """Remove the least important channels/heads of every coupled group (zero configuration)."""

    ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # fraction of units removed
    target_params: Annotated[float, Range(0, 1, lo_open=True)] | None = None  # fraction of parameters kept
    target_flops: Annotated[float, Range(0, 1, lo_open=True)] | None = None  # fraction of FLOPs kept
    importance: Literal["l1", "l2", "taylor"] = "l2"  # unit ranking: weight norms, or Taylor (needs calibration)
    allocation: Literal["uniform", "global", "knapsack"] = "uniform"  # the same fraction of every group; one ranking across groups; or by score per cost (taylor, with a target)
    where: str = "*"  # glob on module names: only groups all of whose layers match are pruned
    round_to: Annotated[int, Range(1)] | None = None  # units kept per group are a multiple of this (None: 8 for channel groups of 256 or more, what quantization groups and kernel tiles divide; 1 for heads and small groups)
    outputs: bool = False  # let the model's output dims shrink too (changes its outputs)
    min_units: Annotated[int, Range(1)] = 1  # the fewest units a group keeps
    calib_batches: Annotated[int, Range(1)] = 8  # importance=taylor, reconstruct: calibration batches read
    reconstruct: bool = False  # refit the Linear / 1x1 Conv2d layers that read pruned channels by least squares on calibration inputs
    reloadable: bool = False  # prune only what a HF config describes (the same sizes in every layer)
    progressive: Annotated[int, Range(0)] = 0  # heal steps after each of `rounds` rounds (0: one shot, no heal)
    rounds: Annotated[int, Range(1)] = 3  # progressive: the target is reached in this many equal rounds

    @property
    def decisive(self) -> tuple[str, ...]:  # type: ignore[override]  # the target in force, and the ranking
        target = "target_flops" if self.target_flops is not None else (
            "target_params" if self.target_params is not None else "ratio")
        return (target, "importance")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]  # only Taylor (and healing) reads calibration
        return self.importance == "taylor" or self.reconstruct or self.progressive > 0

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        return self.progressive > 0

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        self._check_options()
        if self.progressive:
            return heal_each(program, am, self._rounds(program, am), steps=self.progressive, kind="prune")
        self.__dict__.pop("_base_flops", None)  # measured afresh for this model
        if program.device.type == "meta":
            raise ValueError("prune needs real weights to rank units; the model is on the meta device")
        graph: DependencyGraph = am.get("dependency_graph_outputs" if self.outputs else "dependency_graph")
        result = PassResult(modified=False)
        result.diagnostics += graph.diagnostics
        groups = [g for g in graph.groups if self._in_scope(g)]
        for g in graph.groups:
            if g not in groups:
                result.skip(g.modules[0], f"group {g.id} outside where={self.where!r}")
        if self.reloadable:
            groups = describable_groups(program, groups, result)
        if not groups:
            result.note("", "no prunable group found", "warning")
            return result
        if self.importance == "taylor":
            scores = self._taylor(program, groups)
        else:
            scores = {g.id: self._importance(program, g) for g in groups}
        keep = self._allocate(program, groups, scores)
        changed = [g for g in groups if len(keep[g.id]) < g.units]
        if not changed:
            why = ("ratio=0 removes nothing: give a ratio in (0, 1) or target_params / target_flops"
                   if self._target is None and self.ratio == 0 else
                   "nothing to prune at this ratio (groups too small for min_units/round_to)")
            result.note("", why, "warning")
            return result
        if self.reconstruct:
            found = readers(program, kept_masks(program, changed, keep), result)
            grams = input_grams(program, found, program.calib_batches(self.calib_batches))
        attrs_before = numeric_attrs(program.module)
        before = am.get("exported")  # restoring a snapshot clears the analyses
        n_before = len(result.diagnostics)
        snapshot = program.snapshot()
        suspects = apply_keep(program, changed, keep, result, fixed_sizes(graph, changed))
        error = run_error(program)
        while error and suspects:  # sizes baked into the graph as literals: keep those groups whole
            program.restore(snapshot)
            snapshot = program.snapshot()
            result.diagnostics[n_before:] = [d for d in result.diagnostics[n_before:] if d.level != "info"]
            for g in changed:
                if g.id in suspects:
                    result.skip(g.modules[0], f"group {g.id}: a size in the graph follows it but no module "
                                f"attribute holds it, and the model failed with it pruned ({error})")
            changed = [g for g in changed if g.id not in suspects]
            suspects, error = set(), ""
            if changed:
                suspects = apply_keep(program, changed, keep, result, fixed_sizes(graph, changed))
                error = run_error(program)
        if error:
            raise RuntimeError(f"the pruned model does not run: {error}")
        if changed:
            changed = self._same_graph(program, before, graph, changed, keep, snapshot, result, n_before)
        if not changed:
            return result
        if self.reconstruct:
            result.stats["layers_refit"] = apply_refits(program, found, grams, kept_masks(program, changed, keep),
                                                        result)
        if not sync_hf_config(program, attrs_before, result) and self.reloadable:
            raise RuntimeError("reloadable=true: the HF config cannot describe the pruned model: "
                               + next(d.message for d in result.diagnostics if d.target == "<config>"))
        result.modified = True
        result.changes_outputs = self.outputs
        result.stats.update({"groups": len(groups), "groups_pruned": len(changed),
                             "units_removed": sum(g.units - len(keep[g.id]) for g in changed)})
        return result

    def _same_graph(self, program: Program, before: torch.export.ExportedProgram, graph: DependencyGraph,
                    changed: list[Group], keep: dict[int, np.ndarray], snapshot: tuple,
                    result: PassResult, n_before: int) -> list[Group]:
        """Keep the groups whose pruning leaves the traced graph the same but for sizes.

        A branch on a shape, or a size attribute also used as a value, changes the graph: such groups
        are found one at a time and left whole, with the source line where the graphs part.
        """
        error = structure_error(program, before)
        if not error:
            return changed
        log.info("prune: the pruned model traces differently (%s); checking groups one at a time", error)
        program.restore(snapshot)
        kept: list[Group] = []
        for g in changed:
            trial = program.snapshot()
            apply_keep(program, [g], keep, PassResult(modified=False), fixed_sizes(graph, [g]))
            why = run_error(program) or structure_error(program, before)
            program.restore(trial)
            if why:
                result.skip(g.modules[0], f"group {g.id}: pruning it changes what the model computes, not only "
                            f"its sizes: {why}; left whole")
            else:
                kept.append(g)
        result.diagnostics[n_before:] = [d for d in result.diagnostics[n_before:] if d.level == "skipped"]
        if kept:
            apply_keep(program, kept, keep, result, fixed_sizes(graph, kept))
            error = run_error(program) or structure_error(program, before)
            if error:
                raise RuntimeError(f"the pruned model computes something else, not a smaller version: {error}")
        return kept

    # --- options and scope ----------------------------------------------------------------------
    def _check_options(self) -> None:
        if self.target_flops is not None and self.target_params is not None:
            raise ValueError("prune: give target_params or target_flops, not both")
        if self.reloadable and self.allocation != "uniform":
            raise ValueError("prune(reloadable=true) keeps the same count in every layer: it needs allocation=uniform")
        if self.allocation == "knapsack" and (self.importance != "taylor" or self._target is None):
            raise ValueError("prune(allocation=knapsack) compares Taylor scores (output change) across groups per "
                             "parameter or FLOP a unit costs: give importance=taylor and target_params or "
                             "target_flops (or use allocation=global)")

    def _rounds(self, program: Program, am: AnalysisManager) -> list[tuple[str, Callable[[], PassResult]]]:
        """One-shot prunes that together reach the target: round r leaves r/rounds of the cut made."""
        if self.target_flops is not None or self.outputs:
            raise ValueError("prune(progressive=...) reaches ratio or target_params in rounds; with target_flops "
                             "or outputs=true, prune in one shot (progressive=0) and heal after")
        start = sum(p.numel() for p in program.module.parameters())

        def cut(r: int) -> PassResult:
            if self.target_params is not None:
                goal = start * (1.0 - (1.0 - self.target_params) * r / self.rounds)
                now = sum(p.numel() for p in program.module.parameters())
                if goal >= now:
                    out = PassResult(modified=False)
                    out.note("", f"already at {now / start:.4f} of the parameters: nothing to cut this round")
                    return out
                step = dataclasses.replace(self, progressive=0, target_params=goal / now)
            else:
                done, want = self.ratio * (r - 1) / self.rounds, self.ratio * r / self.rounds
                step = dataclasses.replace(self, progressive=0, ratio=1.0 - (1.0 - want) / (1.0 - done))
            return step.run(program, am)

        return [(f"round {r}/{self.rounds}", functools.partial(cut, r)) for r in range(1, self.rounds + 1)]

    def _in_scope(self, g: Group) -> bool:
        return all(fnmatch.fnmatchcase(m.module, self.where) for m in g.members if not m.is_buffer)

    # --- importance -----------------------------------------------------------------------------
    def _importance(self, program: Program, g: Group) -> np.ndarray:
        """Sum over members of |w| (l1) or w^2 (l2) of each unit's slice."""
        score = np.zeros(g.units)
        for m in g.members:
            if m.is_buffer:
                continue
            w = program.tensor(m.fqn).detach().float()
            per_index = _sum_except(w.abs() if self.importance == "l1" else w.pow(2), m.dim)
            valid = m.positions >= 0
            score += np.bincount(m.positions[valid], weights=per_index[valid], minlength=g.units)
        return score

    def _taylor(self, program: Program, groups: list[Group]) -> dict[int, np.ndarray]:
        """First-order estimate of how much removing each unit moves the outputs.

        For random probes r, the Taylor term of <r, f(x)> for removing unit u is
        sum_{w in u} w * d<r, f>/dw; its square averages to |J_u w_u|^2, the squared first-order output
        change (Molchanov et al. 2019 use a task loss instead; with no labels, outputs are the target).
        """
        scores = {g.id: np.zeros(g.units) for g in groups}
        batches = program.calib_batches(self.calib_batches)
        for _ in probe_gradients(program.module, batches, who="prune(importance=taylor)"):
            for g in groups:
                effect = np.zeros(g.units)
                seen: set[tuple[int, int]] = set()
                for m in g.members:
                    t = program.tensor(m.fqn)
                    if m.is_buffer or t.grad is None or (id(t), m.dim) in seen:
                        continue
                    seen.add((id(t), m.dim))
                    per_index = _sum_except(t.detach().float() * t.grad.float(), m.dim)
                    valid = m.positions >= 0
                    effect += np.bincount(m.positions[valid], weights=per_index[valid], minlength=g.units)
                scores[g.id] += effect ** 2
        return scores

    # --- allocation -----------------------------------------------------------------------------
    def _multiple(self, g: Group) -> int:
        """What the units ``g`` keeps are a multiple of: ``round_to``, or by default 8 for a channel group of 64
        or more (a width int4 groups, GEMM tiles and SIMD lanes divide) and 1 otherwise (heads, small groups)."""
        if self.round_to is not None:
            return self.round_to
        return AUTO_ROUND if g.unit == "channel" and g.units >= AUTO_ROUND_MIN_UNITS else 1

    def _n_keep(self, g: Group, ratio: float) -> int:
        keep = g.units - math.floor(g.units * ratio + 1e-9)
        step = self._multiple(g)
        if step > 1:
            keep = max(step, int(round(keep / step)) * step)
        return int(min(g.units, max(self.min_units, keep)))

    def _allocate(self, program: Program, groups: list[Group], scores: dict[int, np.ndarray]
                  ) -> dict[int, np.ndarray]:
        if self.allocation == "uniform":
            ratio = self.ratio if self._target is None else self._search_ratio(program, groups, scores)
            return {g.id: _top(scores[g.id], self._n_keep(g, ratio)) for g in groups}
        return self._allocate_global(program, groups, scores)

    @property
    def _target(self) -> float | None:
        return self.target_flops if self.target_flops is not None else self.target_params

    def _kept_fraction(self, program: Program, groups: list[Group], keep: dict[int, np.ndarray]) -> float:
        """Fraction of the parameters (or, with target_flops, of the FLOPs) that ``keep`` leaves."""
        if self.target_flops is None:
            return _params_kept_fraction(program, groups, keep)
        if not hasattr(self, "_base_flops"):
            self._base_flops = count_flops(program.module, program.example_inputs)
        snapshot = program.snapshot()
        try:
            apply_keep(program, [g for g in groups if len(keep[g.id]) < g.units], keep, PassResult(False))
            flops = count_flops(program.module, program.example_inputs)
        finally:
            program.restore(snapshot)
        if not flops or not self._base_flops:
            raise ValueError("prune(target_flops=...): FLOPs cannot be counted for this model; use target_params")
        return flops / self._base_flops

    def _search_ratio(self, program: Program, groups: list[Group], scores: dict[int, np.ndarray]) -> float:
        """The smallest uniform ratio that meets the target (bisection on the measured fraction)."""
        lo, hi = 0.0, 0.999
        for _ in range(30 if self.target_flops is None else 12):
            mid = (lo + hi) / 2
            keep = {g.id: _top(scores[g.id], self._n_keep(g, mid)) for g in groups}
            if self._kept_fraction(program, groups, keep) > self._target:
                lo = mid
            else:
                hi = mid
        return hi

    def _unit_costs(self, program: Program, groups: list[Group], scores: dict[int, np.ndarray]) -> dict[int, float]:
        """What one unit of each group costs, as a fraction of the model's parameters (or, with target_flops, of
        its FLOPs on the example inputs): the fraction that cutting one step of the group's weakest units saves,
        per unit, measured as the target is (so shared and coupled tensors count as they will)."""
        full = {g.id: np.arange(g.units) for g in groups}
        costs = {}
        for g in groups:
            step = min(self._multiple(g), g.units - 1)
            if step < 1:
                costs[g.id] = float("inf")
                continue
            keep = {**full, g.id: _top(scores[g.id], g.units - step)}
            costs[g.id] = max(1.0 - self._kept_fraction(program, groups, keep), 0.0) / step
        return costs

    def _allocate_global(self, program: Program, groups: list[Group], scores: dict[int, np.ndarray]
                         ) -> dict[int, np.ndarray]:
        """Rank all units together and drop the lowest first: by score / mean score of their group (global), or
        by score / what the unit costs (knapsack: the greedy order of the knapsack that keeps the most score
        within the target's parameters or FLOPs; Taylor scores are output changes, comparable across groups)."""
        entries = []
        costs = self._unit_costs(program, groups, scores) if self.allocation == "knapsack" else {}
        for g in groups:
            s = scores[g.id]
            if self.allocation == "knapsack":  # a group that saves nothing when cut goes last
                cost = costs[g.id]
                rank = s / cost if cost > 0 else np.full(g.units, np.inf)
            else:
                rank = s / (s.mean() + 1e-12)
            entries += [(float(rank[u]), g.id, u) for u in range(g.units)]
        entries.sort()
        by_id = {g.id: g for g in groups}

        def keep_for(k: int) -> dict[int, np.ndarray]:
            removed: dict[int, set[int]] = {g.id: set() for g in groups}
            done = 0
            for _, gid, unit in entries:
                if done >= k:
                    break
                if by_id[gid].units - len(removed[gid]) > max(self.min_units, self._multiple(by_id[gid])):
                    removed[gid].add(unit)
                    done += 1
            keep = {gid: np.array(sorted(set(range(by_id[gid].units)) - r)) for gid, r in removed.items()}
            for g in groups:  # bring survivors back up to a multiple of the group's step, best first
                n, step = len(keep[g.id]), self._multiple(g)
                want = min(g.units, max(step, math.ceil(n / step) * step))
                keep[g.id] = _top(scores[g.id], want) if want != n else keep[g.id]
            return keep

        total = len(entries)
        if self._target is None:
            return keep_for(math.floor(total * self.ratio + 1e-9))
        lo, hi = 0, total  # the fewest removals that meet the target
        while lo < hi:
            mid = (lo + hi) // 2
            if self._kept_fraction(program, groups, keep_for(mid)) <= self._target:
                hi = mid
            else:
                lo = mid + 1
        return keep_for(lo)

def _sum_except(t: torch.Tensor, dim: int) -> np.ndarray:
    other = [d for d in range(t.dim()) if d != dim]
    return (t.sum(dim=other) if other else t).double().numpy()


def _top(score: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.argsort(-score, kind="stable")[:n])


def _params_kept_fraction(program: Program, groups: list[Group], keep: dict[int, np.ndarray]) -> float:
    """Fraction of all model parameters kept if the groups keep ``keep`` units."""
    kept_sizes = {(id(program.tensor(fqn)), dim): int(mask.sum())
                  for (fqn, dim), mask in kept_masks(program, groups, keep).items()}
    total = removed = 0
    seen: set[int] = set()
    for p in program.module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        shape = [kept_sizes.get((id(p), d), s) for d, s in enumerate(p.shape)]
        removed += p.numel() - int(np.prod(shape))
    return (total - removed) / max(total, 1)
