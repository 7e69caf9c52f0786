"""Per-layer plans (step 4 of :mod:`.search`): a pass's value chosen layer by layer against the goal's own floor.

A pass with a per-layer knob (``Pass.per_layer``: ``quantize``'s ``layers`` map) whose uniform choices were
measured on their own (``int8``, ``w8a8``, ``int4``: each gives every layer one value) is planned layer by layer:

- **Units.** The pass's layers in groups that take one value together (:meth:`Pass.layer_units`: layers that read
  one tensor, as ModelOpt's ``auto_quantize`` decides q/k/v together).
- **Loss.** Each unit's loss under each value is estimated to second order from one probed backward pass per
  calibration batch (:func:`~graphopt.analysis.probes.fisher_diagonal`): the value's change of the weights
  (:meth:`Pass.layer_error`) weighed by the Gauss-Newton diagonal, the relative output error it causes alone
  (HAWQ-V2's and ``auto_quantize``'s score, without a task loss). A value whose loss no weight change shows
  (``layer_error`` None: w8a8 rounds the layer's inputs too) is measured instead: the model run on two
  calibration batches with the unit swapped for its variants (:func:`~graphopt.infra.metrics.output_changes`),
  judged by the goal's own figure (the report's quality, or the perplexity ratio) on those batches: on MiniLM the
  outputs' squared change put most of w8a8's loss in one layer whose outliers dominate it, which the
  sentence-embedding cosine does not. The estimates are put in the goal's units by the measured single of each
  value: a value's units' estimates are scaled to add up to what its uniform choice lost end to end
  (``1 - quality``, or the log of the perplexity ratio).
- **Cost.** With size as the objective, the unit's weight bytes under the value. With speed, the time the unit adds
  over the base at each timed setting: the value's uniform choice, timed in the whole model, spread over the units
  by their share of the base's layer time in the latency table (:func:`_added`: a runtime fuses quantized layers
  with their neighbours, which a layer timed alone does not show); a value with no timed uniform choice takes the
  table's time of the layer built cheaply (:meth:`Pass.layer_variant`: rounded to nearest, as fast as the GPTQ
  layer) on the calls the base model makes. Either way a plan is costed without being built.
- **Choice.** A multiple-choice knapsack (:func:`knapsack`, a dynamic programme over the loss budget in
  ``BINS`` steps, each unit's loss rounded up: the plan's predicted loss never exceeds the budget) picks one value
  per unit, the least cost within the budget the floor leaves (:class:`Planner`). Plans are built by the pass with
  that map (GPTQ where a value's choice used it) and measured end to end one at a time, each planned with the
  estimates corrected by what the last one measured (the estimates add the units' losses, which compound).

Plans are made on the base model (the clean-ups alone), not on top of other changes; a floor on quality and one
on perplexity together plan against the quality floor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.layers import weight_rows
from ..analysis.probes import fisher_diagonal
from ..infra.contract import Pass
from ..infra.metrics import Figure, count_weight_bytes, output_changes
from ..infra.program import Program
from ..infra.quality import summarize, task_quality
from .costs import layer_calls
from .goal import Goal
from .measure import Evaluator, Point
from .space import Slot

BINS = 400  # steps of the loss budget in the knapsack
FRACTIONS = (1.0, 0.5, 0.25)  # of the loss budget: the whole, else less where that plan was measured


@dataclass
class Unit:
    """Layers that take one value together, with each value's predicted loss, cost and byte change."""

    names: list[str]
    loss: dict[str, float] = field(default_factory=dict)  # value -> the goal's loss units
    cost: dict[str, float] = field(default_factory=dict)  # value -> what the objective minimises
    bytes: dict[str, int] = field(default_factory=dict)  # value -> weight bytes
    ms: dict[str, dict[str, float]] = field(default_factory=dict)  # value -> setting -> the table's milliseconds
    added: dict[str, dict[str, float]] = field(default_factory=dict)  # value -> setting -> ms over the base's


def knapsack(units: Sequence[Unit], budget: float, bins: int = BINS) -> list[str] | None:
    """One value per unit: the least total ``cost`` whose total ``loss`` stays within ``budget`` (multiple-choice
    knapsack by dynamic programming over the budget in ``bins`` steps, losses rounded up); None if none fits."""
    inf = float("inf")
    # among equal costs, the smaller loss (int8 before w8a8 for the same bytes): a tie-break far under any cost
    nudge = 1e-9 * max((abs(c) for u in units for c in u.cost.values()), default=0.0) / (budget or 1.0)
    best = torch.full((bins + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks: list[list[tuple[str, int, torch.Tensor]]] = []
    for unit in units:
        new = torch.full_like(best, inf)
        options = []
        for value, cost in unit.cost.items():
            loss = max(unit.loss[value], 0.0)
            steps = 0 if loss <= 0 else (math.ceil(loss / budget * bins - 1e-9) if budget > 0 else bins + 1)
            if steps > bins:
                continue
            shifted = torch.full_like(best, inf)
            shifted[steps:] = best[:bins + 1 - steps] + cost + nudge * loss
            better = shifted < new
            new[better] = shifted[better]
            options.append((value, steps, better))
        picks.append(options)
        best = new
    if not math.isfinite(float(best.min())):
        return None
    at = int(best.argmin())
    chosen: list[str] = []
    for options in reversed(picks):  # the last option that improved a cell is the one that holds it
        value, steps = next((v, s) for v, s, better in reversed(options) if better[at])
        chosen.append(value)
        at -= steps
    return chosen[::-1]


def loss_of(point: Point, base: Point, goal: Goal) -> float | None:
    """What ``point`` lost against the base in the units the floor binds: quality lost, or log perplexity ratio."""
    if goal.quality is not None and point.quality is not None and base.quality is not None:
        return base.quality - point.quality
    if goal.ppl is not None and point.ppl is not None and base.ppl is not None:
        return math.log(point.ppl / base.ppl)
    return None


def budget_of(base: Point, goal: Goal) -> float | None:
    if goal.quality is not None and base.quality is not None:
        return base.quality - goal.quality
    if goal.ppl is not None and base.ppl is not None:
        return math.log(goal.ppl / base.ppl)
    return None


def plan_value(choice: Pass) -> str | None:
    """The value ``choice`` gives every layer, where per-layer plans can mix it (its pass has a per-layer knob and a
    value that leaves a layer unchanged); else None. What decides which singles the plans read, and so which are
    measured and timed under the floor."""
    cls = type(choice)
    return choice.layer_value() if cls.per_layer and cls.layer_unchanged else None


def families(slots: Sequence[Slot], singles: dict[int, Point]) -> list[dict[str, tuple[Pass, Point]]]:
    """The measured uniform choices of passes with a per-layer knob, by family (the choices that differ only in
    the options a layer's value stands for), ``{value: (choice, point)}``; a plan mixes them with the value that
    leaves a layer unchanged (``Pass.layer_unchanged``)."""
    out: dict[str, dict[str, tuple[Pass, Point]]] = defaultdict(dict)
    for slot in slots:
        for choice in slot.choices:
            point = singles.get(id(choice))
            value = plan_value(choice)
            if value is None or point is None or point.failed:
                continue
            defaults = type(choice)().options(all=True)
            kin = dataclasses.replace(choice, **{o: defaults[o] for o in type(choice).per_layer})
            out[str(kin)].setdefault(value, (choice, point))
    return list(out.values())


@dataclass
class Planner:
    """One family's units, planned on demand: each plan is the knapsack's answer within the budget the floor leaves,
    its estimated loss corrected by what the last plan measured (``correction``: measured over estimated loss).
    The estimates add the units' losses; on SmolLM2 their errors compound, and the first plan lost twice its
    estimate (x1.083 perplexity where x1.041 was estimated): the next plan spends the budget at that rate."""

    family: dict[str, tuple[Pass, Point]]
    units: list[Unit]
    base: Point
    evaluator: Evaluator
    budget: float
    correction: float = 1.0
    estimates: dict[str, float] = field(default_factory=dict)  # a planned choice's text -> its estimated loss

    def plan(self, fraction: float = 1.0) -> tuple[Pass, Point] | None:
        """The plan within ``fraction`` of the budget and its predicted point; None when it would give every unit
        one value (a uniform choice, measured already) or nothing fits."""
        chosen = knapsack(self.units, self.budget * fraction / self.correction)
        if chosen is None or len(set(chosen)) < 2:
            return None
        choice = _planned(self.family, self.units, chosen)
        self.estimates[str(choice)] = sum(u.loss[v] for u, v in zip(self.units, chosen))
        return choice, _predicted(choice, self.units, chosen, self.base, self.evaluator, self.correction)

    def observe(self, choice: Pass, measured: Point) -> None:
        """Learn the correction from a measured plan of this planner."""
        loss, estimate = loss_of(measured, self.base, self.evaluator.goal), self.estimates.get(str(choice))
        if loss is not None and estimate and loss > 0:
            self.correction = loss / estimate


def dominated(family: dict[str, tuple[Pass, Point]], base: Point, goal: Goal) -> dict[str, str]:
    """``{value: the value that beats it}``: values whose uniform choice another's beats on every figure the goal
    counts (no larger, no slower at any timed setting, less lost), left out before their per-layer losses are
    estimated: w8a8 under a size goal, where int8 weights are as small and keep more (on SmolLM2 measuring w8a8
    layer by layer took 3.4 minutes for nothing)."""
    out = {}
    for value, (_, point) in family.items():
        loss = loss_of(point, base, goal)
        for other, (rival, p) in family.items():
            their = loss_of(p, base, goal)
            faster = all(p.speedups.get(k, 0.0) >= s for k, s in point.speedups.items()) if goal.needs_latency \
                else True
            if other != value and other not in out and loss is not None and their is not None and their < loss \
                    and p.size <= point.size and faster:
                out[value] = rival.label()
                break
    return out


def layer_plans(evaluator: Evaluator, slots: Sequence[Slot], singles: dict[int, Point], base: Point, goal: Goal
                ) -> tuple[list[Planner], list[str]]:
    """A planner for each family of measured uniform choices with a per-layer knob, and notes on what was not
    planned and why."""
    budget = budget_of(base, goal)
    if goal.objective == "quality" or budget is None or budget <= 0:
        return [], ["per-layer plans: none (they spend a quality or perplexity floor on speed or size)"]
    if not evaluator.calib:
        return [], ["per-layer plans: none (the loss of each layer's value is estimated on calibration data)"]
    if goal.needs_latency and not all(k in base.ms and k in base.layers for k in base.speedups):
        return [], ["per-layer plans: none (the base's layers were not costed on the latency table)"]
    planners, notes = [], []
    for family in families(slots, singles):
        for value, better in dominated(family, base, goal).items():
            notes.append(f"per-layer plans: {family.pop(value)[0].label()} left out, {better} is as small, as fast "
                         "and lost less as a uniform choice")
        units, why = _units(evaluator, family, base, goal)
        if why:
            notes.append(f"per-layer plans of {next(iter(family.values()))[0].name}: none ({why})")
        else:
            planners.append(Planner(family, units, base, evaluator, budget))
    return planners, notes


def _units(evaluator: Evaluator, family: dict[str, tuple[Pass, Point]], base: Point, goal: Goal
           ) -> tuple[list[Unit], str]:
    """The family's units with each value's loss (scaled by the measured singles), cost and bytes; or why not."""
    model = evaluator.model
    program = Program(model, evaluator.inputs, calib=evaluator.calib)
    some = next(iter(family.values()))[0]
    units = [Unit(list(names)) for names in some.layer_units(program)]
    if not units:
        return [], "no layer to plan"
    names = [n for u in units for n in u.names]
    modules = {n: model.get_submodule(n) for n in names}
    params = {n: m.weight for n, m in modules.items()}
    fisher, energy = fisher_diagonal(model, params, program.calib_batches(8), who="per-layer plans")
    swaps: dict[tuple[int, str], Callable[[], dict[str, nn.Module]]] = {}  # no weight change shows the loss
    for value, (choice, _) in family.items():
        for at, unit in enumerate(units):
            errors = [choice.layer_error(program, n, value) for n in unit.names]
            if all(e is not None for e in errors):
                unit.loss[value] = sum(float((weight_rows(modules[n], fisher[n]) * e.detach().float().pow(2)).sum())
                                       for n, e in zip(unit.names, errors)) / (energy or 1.0)
                continue
            variants = {n: choice.layer_variant(program, n, value) for n in unit.names}
            if all(v is not None for v in variants.values()):
                swaps[(at, value)] = lambda variants=variants: variants  # type: ignore[misc]
    for (at, value), change in output_changes(model, swaps, program.calib_batches(2), "per-layer plans: the loss "
                                              "of each layer swapped", figure=_goal_figure(goal)).items():
        units[at].loss[value] = change
    raw = {value: [u.loss.get(value, 0.0) for u in units] for value in family}
    for value, (_, point) in family.items():  # the estimates in the goal's units, by the value's measured single
        measured, total = loss_of(point, base, goal), sum(raw[value])
        scale = max(measured, 0.0) / total if measured is not None and total > 0 else 0.0
        for unit in units:
            if value in unit.loss:
                unit.loss[value] *= scale
    for unit in units:
        unit.loss[type(some).layer_unchanged] = 0.0
    _costs(evaluator, family, program, units, base, goal)
    return units, ""


def _goal_figure(goal: Goal) -> Figure:
    """The report's quality figure of swapped outputs against the original's, as the loss the goal's floor counts
    (``1 - quality``, or the log of the perplexity ratio): a layer swapped is judged as the goal judges models."""
    def loss(now: list[Any], reference: list[Any]) -> float:
        figure = task_quality(list(zip(now, reference)))
        if figure is None:
            return 0.0
        point = Point("", quality=figure.value, ppl=figure.extra.get("ppl ratio"))
        return loss_of(point, Point("", quality=1.0, ppl=1.0), goal) or 0.0

    return summarize, loss


def _costs(evaluator: Evaluator, family: dict[str, tuple[Pass, Point]], program: Program, units: list[Unit],
           base: Point, goal: Goal) -> None:
    """Each unit's bytes (and milliseconds per setting, from the latency table) under each value; the objective's
    cost: bytes, or the time the unit adds relative to the base, summed over the settings."""
    some = next(iter(family.values()))[0]
    keep = type(some).layer_unchanged
    calls = {}
    if goal.needs_latency:
        calls = {evaluator.key(b, t): (layer_calls(program.module, evaluator.inputs.with_batch(b), goal.decode), t)
                 for b, t in evaluator.settings}
    for unit in units:
        for value in list(unit.loss):
            variants: list[nn.Module | None] = [some.layer_variant(program, n, value) for n in unit.names]
            if any(v is None for v in variants):
                del unit.loss[value]
                continue
            unit.bytes[value] = sum(count_weight_bytes(v) for v in variants)  # type: ignore[arg-type]
            for key, (signatures, threads) in calls.items():
                times = [evaluator.costs.layer_ms(v, signatures.get(n, []), threads)
                         for n, v in zip(unit.names, variants)]
                if any(t is None for t in times):
                    unit.ms.pop(value, None)
                    break
                unit.ms.setdefault(value, {})[key] = sum(times)  # type: ignore[arg-type]
        if calls and keep not in unit.ms:  # its layers cannot be timed alone: no value is credited with speed
            unit.ms = {v: dict.fromkeys(calls, 0.0) for v in unit.loss}
    for key in calls:
        _added(family, units, base, key, keep)
    for unit in units:
        for value in [v for v in unit.loss if not calls or v in unit.added]:  # (a value not timed is not offered)
            unit.cost[value] = float(unit.bytes[value]) if goal.objective == "size" else \
                sum(ms / base.ms[key] for key, ms in unit.added[value].items())
        unit.loss = {v: loss for v, loss in unit.loss.items() if v in unit.cost}


def _added(family: dict[str, tuple[Pass, Point]], units: list[Unit], base: Point, key: str, keep: str) -> None:
    """Each unit's milliseconds over the base's at setting ``key`` under each value. A value whose uniform choice
    was timed spreads that measured change over the units by their share of the base's layer time: a runtime
    fuses a quantized layer with its neighbours (onnxruntime's integer matmuls), which a layer timed alone does
    not show (MiniLM's w8a8 layers exported one by one were slower than float; the model was 2x faster). Other
    values take the table's difference, scaled as the base's layers are (:func:`_scale`)."""
    timed = [u for u in units if keep in u.ms and key in u.ms[keep]]
    share = sum(u.ms[keep][key] for u in timed) or 1.0
    for unit in timed:
        for value in unit.ms:
            point = family[value][1] if value in family else None
            if value == keep:
                ms = 0.0
            elif point is not None and key in point.ms:
                ms = (point.ms[key] - base.ms[key]) * unit.ms[keep][key] / share
            elif key in unit.ms[value]:
                ms = _scale(base, key) * (unit.ms[value][key] - unit.ms[keep][key])
            else:
                continue
            unit.added.setdefault(value, {})[key] = ms


def _scale(base: Point, key: str) -> float:
    """The base's measured milliseconds per table millisecond of its layers at setting ``key`` (at most 1: the
    layers timed alone over-count a compiled model, as in :func:`~.predict.layered_time`)."""
    total = sum(t for t in base.layers[key].values() if t is not None)
    return min(base.ms[key], total) / total if total > 0 else 0.0


def _planned(family: dict[str, tuple[Pass, Point]], units: list[Unit], chosen: list[str]) -> Pass:
    """The pass that applies ``chosen``: the choice of a value it uses that reads calibration data (GPTQ) if
    any, else of its commonest value, with the other units' values in its per-layer map (globs where every
    block's layer of one name takes one value)."""
    keep = type(next(iter(family.values()))[0]).layer_unchanged
    count = Counter(v for v, u in zip(chosen, units) for _ in u.names if v != keep)
    calibrated = [v for v in count if family[v][0].needs_calibration]
    main = max(calibrated or count, key=lambda v: count[v])
    choice = family[main][0]
    plan = {n: v for v, u in zip(chosen, units) for n in u.names}
    return dataclasses.replace(choice, **{type(choice).per_layer[0]: compressed(plan, main, [u.names for u in units])})


def compressed(plan: dict[str, str], main: str, units: Sequence[Sequence[str]] = ()) -> dict[str, str]:
    """``{layer glob: value}`` for the layers whose value is not ``main``, each written as the first of: its unit's
    glob (``layers.5.self_attn.[qkv]_proj`` for q/k/v, ``layers.5.mlp.*p_proj`` for gate/up), its name, each with
    the block index as ``*`` first (``layers.*.mlp.down_proj``), that matches only planned layers of its value.
    Applied as the pass applies its map (a layer no glob matches takes ``main``), it gives every planned layer
    its value."""
    unit_of = {n: list(u) for u in units for n in u}
    out: dict[str, str] = {}
    for name, value in plan.items():
        if value == main:
            continue
        own = [*_unit_globs(unit_of.get(name, [name])), name]
        globs = [g for o in own for g in (re.sub(r"(?<=\.)\d+(?=\.)", "*", o), o)]
        out[next(g for g in globs if all(v == value for n, v in plan.items() if fnmatch.fnmatchcase(n, g)))] = value
    return {k: v for k, v in out.items()  # a layer's own name where a glob of its value covers it already
            if k not in plan or not any(g != k and fnmatch.fnmatchcase(k, g) for g in out)}


def _unit_globs(unit: list[str]) -> list[str]:
    """Globs of a unit's names: one character class where they differ in one place (``[qkv]_proj``), then their
    common prefix and suffix around ``*``; none for a unit of one layer."""
    if len(unit) < 2:
        return []
    prefix = os.path.commonprefix(unit)
    prefix = prefix[:prefix.rfind(".") + 1]
    rests = [n[len(prefix):] for n in unit]
    suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
    out = []
    if len({len(r) for r in rests}) == 1:
        differ = [i for i in range(len(rests[0])) if len({r[i] for r in rests}) > 1]
        if len(differ) == 1 and all(c.isalnum() for r in rests for c in r[differ[0]]):
            i = differ[0]
            out.append(f"{prefix}{rests[0][:i]}[{''.join(sorted({r[i] for r in rests}))}]{rests[0][i + 1:]}")
    return [*out, f"{prefix}*{suffix}"]


def _predicted(choice: Pass, units: list[Unit], chosen: list[str], base: Point, evaluator: Evaluator,
               correction: float = 1.0) -> Point:
    """The plan's figures from its units' (the rest of the model as in the base), its loss times ``correction``."""
    keep = type(choice).layer_unchanged
    point = Point(str(choice), predicted=True, quality_name=base.quality_name)
    loss = correction * sum(u.loss[v] for u, v in zip(units, chosen))
    if base.quality is not None:
        point.quality = base.quality - loss if evaluator.goal.quality is not None else None
    if base.ppl is not None and evaluator.goal.quality is None:
        point.ppl = base.ppl * math.exp(loss)
    point.size = base.size + sum(u.bytes[v] - u.bytes[keep] for u, v in zip(units, chosen)) / evaluator.base_bytes
    for key, speedup in base.speedups.items():
        added = sum(u.added.get(v, {}).get(key, 0.0) for u, v in zip(units, chosen))
        point.speedups[key] = speedup * base.ms[key] / max(base.ms[key] + added, 1e-9)
    return point


def describe(plan: Pass, predicted: Point, measured: Point) -> str:
    """One line: the plan, its predicted and measured figures."""
    def figures(p: Point) -> str:
        parts = [f"{p.quality_name or 'quality'} {p.quality:.4f}" if p.quality is not None else "",
                 f"ppl x{p.ppl:.4f}" if p.ppl is not None else "",
                 f"{p.speedup:.2f}x" if p.speedup is not None else "", f"size {p.size:.3f}"]
        return ", ".join(x for x in parts if x)

    return f"per-layer plan {plan.label()}: predicted {figures(predicted)}; measured {figures(measured)}"

