"""``optimize(model, inputs, goal=...)``'s search: the best pipeline of the declared space for a goal.

1. **One change at a time.** Every choice of every slot (:mod:`.space`) is built and measured on its own,
   breadth first (the mildest choice of every family, then the next of each); a choice that misses the
   quality floor alone ends its pass's stronger choices of the same :func:`~.space.family` (a stronger cut of the
   same kind loses more: the assumption behind the floor's pruning, said in the result).
2. **Every combination, predicted.** Each combination of the single changes that met the floor is estimated
   from them (:mod:`.predict`): quality losses (``1 - figure``) add, size and perplexity ratios multiply, and
   the time is predicted layer by layer from the latency table on the goal's runtime (:mod:`.costs`; Amdahl's
   law: two changes compound only on the layers both change). The space is a product of a few slots with a
   few choices each (hundreds of combinations), so it is enumerated exhaustively rather than sampled: no
   combination is left out, and the estimate of each costs nothing. This is the knapsack of the issue solved
   by enumeration at pass level; per-layer choices are step 4's.
3. **The best predictions, measured.** The combinations predicted to meet the goal, best objective first,
   are built and measured end to end (``goal.trials`` of them, within ``goal.max_time``); the search never
   stops at the first that meets the goal, and the answer is always a measured point: predictions only decide
   what to measure.
4. **Per-layer plans.** A pass with a per-layer knob (``quantize``'s ``layers``) gets a value per group of
   layers, chosen by a knapsack against the floor (:mod:`.layerwise`): losses estimated from probed gradients
   and scaled by the measured uniform choices, times read from the latency table; ``goal.plans`` of them are
   built and measured.
5. **Repaired near the front.** The ``goal.heal`` measured candidates nearest the floor whose quality
   floor is all they miss (and that hold a lossy change before the repairing pass's stage) are built again
   with the repairing pass (``heal``: distillation from the original) and measured: healing is too slow to
   try on every candidate, and only changes the quality of the few whose quality binds. One that meets the
   floor healed is followed by its family's next stronger choice, healed, which step 1 left out.
6. **Confirmed together.** With speed as the objective, the best ``goal.confirm`` points that meet the goal are
   rebuilt and timed again in one session (the original and each in turns), and keep those figures: the
   answer is picked from one measurement of its rivals.

The result holds every measured point, the Pareto front (quality against speed-up and size), the best point
meeting the goal, or, when none does, the nearest points and which constraint binds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..infra.contract import Pass
from ..infra.text import markdown_table
from ..progress import Progress
from .goal import Goal, GoalError
from .layerwise import FRACTIONS, describe, layer_plans, plan_value
from .measure import Evaluator, Point, meets_floor
from .predict import predict, prediction_check
from .space import Combination, Slot, Space, combinations, family, midpoint, pipeline_of, without

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What the search measured, its front, and its answer (``best``: None when no point meets the goal)."""

    goal: Goal
    points: list[Point]
    best: Point | None
    seconds: float
    predicted: int = 0  # combinations estimated
    left_out: list[str] = field(default_factory=list)  # choices not searched, with why
    notes: list[str] = field(default_factory=list)

    @property
    def front(self) -> list[Point]:
        """The measured points no other measured point beats on every figure (quality, speed-up, size)."""
        ok = [p for p in self.points if not p.failed]
        return [p for p in ok if not any(_dominates(q, p) for q in ok)]

    @property
    def nearest(self) -> list[Point]:
        """When no point meets the goal: the three with the smallest relative shortfall (:meth:`Point.shortfall`)."""
        return sorted((p for p in self.points if not p.failed), key=lambda p: p.shortfall(self.goal))[:3]

    @property
    def binding(self) -> str:
        """Which constraint stops the goal (empty when a point meets it)."""
        if self.best is not None:
            return ""
        near = self.nearest
        if not near:
            return "no candidate could be built: " + "; ".join(sorted({p.error for p in self.points}))[:500]
        return f"no measured point meets {self.goal}; the nearest, {near[0].pipeline}, misses: " + \
            "; ".join(near[0].meets(self.goal))

    def table(self) -> str:
        """Every measured point as a Markdown table: the best marked ``*``, the front ``f``."""
        front = {id(p) for p in self.front}
        name = next((p.quality_name for p in self.points if p.quality_name), "quality")
        has_ppl = any(p.ppl is not None for p in self.points)
        keys = next((list(p.speedups) for p in self.points if len(p.speedups) > 1), [])
        several = bool(keys)
        rows = []
        for p in sorted(self.points, key=lambda p: (p.failed, -objective(p, self.goal))):
            mark = "*" if p is self.best else ("f" if id(p) in front else "")
            missed = p.meets(self.goal)
            settings = " / ".join(f"{v:.2f}" for v in p.speedups.values()) if len(p.speedups) > 1 else ""
            rows.append([mark, p.pipeline, _num(p.quality), *([_num(p.ppl)] if has_ppl else []),
                         _num(p.speedup, 2), *([settings] if several else []), f"{p.size:.3f}", f"{p.seconds:.0f}",
                         "yes" if not missed else "; ".join(missed)[:80]])
        header = ["", "pipeline", name, *(["ppl ratio"] if has_ppl else []), "speed-up (worst)",
                  *([" / ".join(keys)] if several else []), "size", "time s", "meets goal"]
        return markdown_table(header, rows)

    def __str__(self) -> str:
        lines = [f"search for {self.goal}: {len(self.points)} points measured, {self.predicted} combinations "
                 f"predicted, {self.seconds:.0f} s", self.table()]
        lines.append(f"best: {self.best.pipeline}" if self.best else self.binding)
        lines += [f"not searched: {w}" for w in self.left_out] + self.notes
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write ``path``: quality against speed-up and against size, the front joined, the best ringed."""
        from ..infra.plots import plot_front

        ok = [p for p in self.points if not p.failed]
        return plot_front([(label(p), p.quality, p.speedup, p.size) for p in ok], [label(p) for p in self.front],
                          label(self.best) if self.best else None, path,
                          quality_name=next((p.quality_name for p in ok if p.quality_name), "quality"))


def label(p: Point | Combination) -> str:
    """A point's (or a candidate's) own passes: its pipeline without the clean-ups every candidate starts with."""
    text = p.pipeline if isinstance(p, Point) else str(pipeline_of(p))
    return text.removeprefix(str(pipeline_of(()))).lstrip(",") or "original"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def objective(p: Point, goal: Goal) -> float:
    """The figure the goal maximises (size negated); -inf for a failed point or one not timed."""
    if p.failed:
        return float("-inf")
    if goal.objective == "size":
        return -p.size
    if goal.objective == "quality":
        return p.quality if p.quality is not None else float("-inf")
    return p.speedup if p.speedup is not None else float("-inf")


def best_of(points: list[Point], goal: Goal) -> Point | None:
    """The point with the best objective, where those within ``goal.tie`` of it count as equal and the higher
    quality of them wins; None if empty. The margin is a fraction of the best speed-up (a speed-up 1% higher on a
    noisy machine is not worth a worse model) or of the best size reduction (0.59 of the bytes ties with 0.594,
    not 0.99 with 1.0); quality as the objective has no margin."""
    if not points:
        return None
    top = max(objective(p, goal) for p in points)
    if goal.objective == "quality" or not math.isfinite(top):
        floor = top
    elif goal.objective == "size":  # objective is -size: tie on the reduction 1 - size
        floor = top - goal.tie * max(1.0 + top, 0.0)
    else:
        floor = top - goal.tie * abs(top)
    tied = [p for p in points if objective(p, goal) >= floor]
    return max(tied, key=lambda p: (p.quality or 0.0, objective(p, goal)))


def _dominates(a: Point, b: Point) -> bool:
    def figures(p: Point) -> list[float]:
        return [p.quality if p.quality is not None else float("-inf"), -(p.ppl or 1.0),
                p.speedup if p.speedup is not None else 0.0, -p.size]

    fa, fb = figures(a), figures(b)
    return all(x >= y for x, y in zip(fa, fb)) and any(x > y for x, y in zip(fa, fb))


def meets_budget(p: Point, goal: Goal) -> bool:
    """Speed-up and size within the goal (the constraints a repair such as heal does not change)."""
    if goal.speedup is not None and (p.speedup is None or p.speedup < goal.speedup):
        return False
    return not (goal.size is not None and p.size > goal.size)


class Search:
    """One search: the evaluator that builds and measures, the slots, the goal and its clock."""

    def __init__(self, evaluator: Evaluator, slots: Sequence[Slot], goal: Goal, repairs: Sequence[Pass] = ()) -> None:
        self.evaluator, self.slots, self.goal = evaluator, list(slots), goal
        self.repairs = list(repairs) if goal.heal else []
        self.start = time.perf_counter()
        self.points: list[Point] = []
        self.combos: dict[str, Combination] = {}  # pipeline text -> the choices that made it
        self.notes: list[str] = []

    def _out_of_time(self) -> bool:
        return time.perf_counter() - self.start > self.goal.max_time

    def _measure(self, combo: Combination, progress: Progress) -> Point:
        # (the original and single changes are costed layer by layer: combinations are predicted from them)
        point = self.evaluator.measure(pipeline_of(combo), layers=len(combo) <= 1)
        if all(point.pipeline != p.pipeline for p in self.points):
            self.points.append(point)
            self.combos[point.pipeline] = combo
        best = self.best()
        progress.update(best=label(best) if best else "none yet")
        return point

    def best(self) -> Point | None:
        return best_of([p for p in self.points if not p.meets(self.goal)], self.goal)

    def run(self) -> tuple[list[Point], int]:
        """Measure singles, predict every combination, measure the best predictions; (points, predicted)."""
        kin = Counter(family(c) for s in self.slots for c in s.choices)
        n_singles = sum(kin.values()) + self.goal.refine * sum(n > 1 for n in kin.values())  # (refinable: 2 or more)
        n_repaired = self.goal.heal * len(self.repairs)
        total = 1 + n_singles + self.goal.trials + self.goal.plans + n_repaired
        with Progress("search", total=total, unit="candidate") as progress:
            base = self._measure((), progress)
            if base.failed:
                raise GoalError(f"the original model (pipeline {base.pipeline!r}) could not be measured: {base.error}")
            singles = self._singles(progress)
            ranked = self._ranked(singles, base)
            tried = []
            for measured, (combo, _) in enumerate(ranked[:self.goal.trials]):
                if self._out_of_time():
                    self.notes.append(f"stopped at max_time={self.goal.max_time:g} s with {measured} of "
                                      f"{min(self.goal.trials, len(ranked))} combinations measured")
                    break
                tried.append((self._measure(combo, progress), [singles[id(c)] for c in combo]))
            else:
                self._plans(singles, base, progress)
                self._repair(progress)
            check = prediction_check(tried, base)
            if check:
                self.notes.append(check)
            self._confirm()
        return self.points, len(ranked)

    def _plans(self, singles: dict[int, Point], base: Point, progress: Progress) -> None:
        """Measure up to ``goal.plans`` per-layer plans (:mod:`.layerwise`), one at a time: each round, every
        family's plan within the floor's budget (a smaller share of it where that plan was measured), corrected
        by what its last plan measured; the best predicted is built and measured."""
        if not self.goal.plans:
            return
        planners, notes = layer_plans(self.evaluator, self.slots, singles, base, self.goal)
        self.notes += notes
        measured = {p.pipeline for p in self.points}
        for _ in range(self.goal.plans):
            offers = []
            for planner in planners:
                for fraction in FRACTIONS:
                    offer = planner.plan(fraction)
                    if offer is not None and str(pipeline_of((offer[0],))) not in measured:
                        offers.append((planner, *offer))
                        break
            if not offers:
                return
            if self._out_of_time():
                self.notes.append(f"stopped at max_time={self.goal.max_time:g} s before the per-layer plans")
                return
            planner, choice, predicted = min(offers, key=lambda o: (bool(o[2].meets(self.goal)),
                                                                     -objective(o[2], self.goal)))
            point = self._measure((choice,), progress)
            measured.add(point.pipeline)
            planner.observe(choice, point)
            self.notes.append(describe(choice, predicted, point))

    def _confirm(self) -> None:
        """With speed as the objective, the best ``goal.confirm`` points that meet the goal rebuilt and timed again,
        together (:meth:`Evaluator.retime`): the answer is picked from one measurement of its rivals, not from
        runs minutes apart, whose speed-ups on 2 cores move by 10-30%. Each keeps its new figures; the notes
        say what moved."""
        if self.goal.objective != "speedup" or self.goal.confirm < 2:
            return
        meeting = sorted((p for p in self.points if not p.meets(self.goal)), key=lambda p: -objective(p, self.goal))
        rivals = meeting[:self.goal.confirm]
        if len(rivals) < 2:
            return
        if self._out_of_time():
            self.notes.append(f"stopped at max_time={self.goal.max_time:g} s before timing the best "
                              f"{len(rivals)} points again together")
            return
        first = self.best()
        moved = []
        for point in self.evaluator.retime([(p, pipeline_of(self.combos[p.pipeline])) for p in rivals]):
            at = next(i for i, p in enumerate(self.points) if p.pipeline == point.pipeline)
            moved.append(f"{label(point)} {self.points[at].speedup:.2f}x -> {point.speedup:.2f}x")
            self.points[at] = point
        best = self.best()
        change = "" if best is first or best is None or first is None or best.pipeline == first.pipeline else \
            f"; the best is now {label(best)} (was {label(first)})"
        self.notes.append(f"timed again together: {', '.join(moved)}{change}")

    def _repair(self, progress: Progress) -> None:
        """Measure the candidates :meth:`repairable` names again with each repairing pass, ``goal.heal`` builds
        per pass. A repaired candidate that meets the quality floor is followed, first, by the next stronger
        choice of its family that the floor rule left unmeasured (:meth:`stronger`), repaired too: the milder
        cut missed the floor unrepaired, not repaired."""
        for repair in self.repairs:
            queue = self.repairable(repair)[:self.goal.heal]
            if not queue:
                self.notes.append(f"{repair.label()}: no measured candidate misses only the quality floor with a "
                                  "lossy change it can repair")
            for _ in range(self.goal.heal):
                if not queue:
                    break
                combo = queue.pop(0)
                if self._out_of_time():
                    self.notes.append(f"stopped at max_time={self.goal.max_time:g} s before {repair.label()} of "
                                      f"{str(pipeline_of(combo))!r}")
                    return
                point = self._measure((*combo, repair), progress)
                stronger = self.stronger(combo) if meets_floor(point, self.goal) else None
                if stronger is not None:
                    self.notes.append(f"{label(point)} meets the floor: {repair.label()} tried on "
                                      f"{label(stronger)}, which the floor rule left out")
                    queue.insert(0, stronger)

    def stronger(self, combo: Combination) -> Combination | None:
        """``combo`` with one of its choices replaced by the next stronger choice of the same :func:`~.space.family`, one
        that was not measured on its own (the floor rule dropped it); None if there is none."""
        measured = {p.pipeline for p in self.points}
        for i, choice in enumerate(combo):
            slot = next((s for s in self.slots if any(c is choice for c in s.choices)), None)
            if slot is None:
                continue
            kin = [c for c in slot.choices if family(c) == family(choice)]
            at = next(k for k, c in enumerate(kin) if c is choice)
            if at + 1 < len(kin) and str(pipeline_of((kin[at + 1],))) not in measured:
                return (*combo[:i], kin[at + 1], *combo[i + 1:])
        return None

    def repairable(self, repair: Pass) -> list[Combination]:
        """The measured candidates ``repair`` may lift over the goal, nearest the floor first (then best
        objective): those that miss the quality floor (or, when quality is the objective, any) but meet the
        speed and size constraints, with a change before ``repair``'s stage that is lossy (declares a
        ``change``) and changed the model. (A heal recovers part of a loss: SmolLM2 pruned 10%, perplexity
        x1008, healed x20.7; one block dropped, x1.13, is the nearer candidate.)"""
        out = []
        for p in self.points:
            combo = self.combos[p.pipeline]
            lossy = [c for c in combo if type(c).stage < type(repair).stage and type(c).change
                     and c.label() not in p.unchanged]
            if p.failed or not lossy or any(type(c) is type(repair) for c in combo):
                continue
            if meets_budget(p, self.goal) and (self.goal.objective == "quality" or not meets_floor(p, self.goal)):
                out.append(p)
        out.sort(key=lambda p: (p.shortfall(self.goal), -objective(p, self.goal)))
        return [self.combos[p.pipeline] for p in out]

    def _singles(self, progress: Progress) -> dict[int, Point]:
        """Measure every choice on its own, breadth first: the mildest choice of every family of every slot, then
        the second of each, and so on, so that a search stopped by ``max_time`` has tried every kind of change
        at least once (SmolLM2's compiled decode reached only half of them slot by slot); then refine each slot."""
        singles: dict[int, Point] = {}
        measured: set[str] = set()  # labels of the choices measured
        dropped: dict[tuple, str] = {}  # (slot, family) -> why its stronger choices are not measured
        for at, choice in self._breadth_first():
            kind = (at, family(choice))
            if kind in dropped and not self._plans_read(choice):
                self.notes.append(f"{choice.label()} not measured: {dropped[kind]}")
                progress.update()
                continue
            moot = choice.moot(self.evaluator.model)
            same = without(choice, moot).label() if moot else ""
            if same in measured:
                self.notes.append(f"{choice.label()} not measured: on this model it is {same} "
                                  f"({'; '.join(moot.values())})")
                progress.update()
                continue
            measured.add(choice.label())
            if self._out_of_time():
                self.notes.append(f"stopped at max_time={self.goal.max_time:g} s before {choice.label()}")
                return singles
            point = self._measure((choice,), progress)
            if choice.label() in point.unchanged:  # nothing to do on this model: no combination needs it
                self.notes.append(f"{choice.label()} changed nothing on this model: left out of the combinations")
                dropped[kind] = f"{choice.label()} changed nothing on this model"
                continue
            singles[id(choice)] = point
            if not point.failed and not meets_floor(point, self.goal):
                dropped[kind] = f"the milder {choice.label()} already misses the quality floor"
        for at, slot in enumerate(self.slots):
            self.slots[at] = self._refine(slot, singles, progress)
        return singles

    def _plans_read(self, choice: Pass) -> bool:
        """Whether the per-layer plans read ``choice``'s measured loss (a uniform value of a per-layer knob, such as
        all-int4): measured even where a milder choice of its family missed the floor, since a plan gives that
        value to the layers that bear it."""
        return bool(self.goal.plans) and plan_value(choice) is not None

    def _breadth_first(self) -> list[tuple[int, Pass]]:
        """(slot index, choice) pairs: each choice ranked by its place in its family (mildest 0), then slot order."""
        order = []
        for at, slot in enumerate(self.slots):
            seen: Counter = Counter()
            for pos, choice in enumerate(slot.choices):
                order.append(((seen[family(choice)], at, pos), at, choice))
                seen[family(choice)] += 1
        return [(at, choice) for _, at, choice in sorted(order, key=lambda item: item[0])]

    def _refine(self, slot: Slot, singles: dict[int, Point], progress: Progress) -> Slot:
        """``slot`` with up to ``goal.refine`` choices per family measured by bisection between the family's last
        measured choice that meets the quality floor and the next, which misses it (:func:`~.space.midpoint`): the cut
        the floor allows, not only the listed ones. A refined choice joins the combinations like any other."""
        choices = list(slot.choices)
        for kind in dict.fromkeys(family(c) for c in choices):
            for _ in range(self.goal.refine):
                kin = [c for c in choices if family(c) == kind and id(c) in singles and not singles[id(c)].failed]
                pair = next(((a, b) for a, b in zip(kin, kin[1:]) if meets_floor(singles[id(a)], self.goal)
                             and not meets_floor(singles[id(b)], self.goal)), None)
                mid = midpoint(*pair) if pair else None
                if mid is None or self._out_of_time():
                    break
                point = self._measure((mid,), progress)
                self.notes.append(f"{mid.label()} measured between {pair[0].label()}, which meets the quality floor, "
                                  f"and {pair[1].label()}, which misses it")
                if point.failed:
                    break
                singles[id(mid)] = point
                choices.insert(next(i for i, c in enumerate(choices) if c is pair[1]), mid)
        return Slot(slot.name, slot.stage, tuple(choices))

    def _ranked(self, singles: dict[int, Point], base: Point) -> list[tuple[Combination, Point]]:
        """Combinations of two or more single changes that met the floor, predicted; those predicted to meet the
        whole goal first, in the order :func:`best_of` would pick them (ties within ``goal.tie`` to the higher
        predicted quality), then the others, best objective first."""
        usable = [Slot(s.name, s.stage, tuple(c for c in s.choices
                                               if id(c) in singles and meets_floor(singles[id(c)], self.goal)))
                  for s in self.slots]
        out = []
        for combo in combinations([s for s in usable if s.choices]):
            if len(combo) < 2:
                continue
            out.append((combo, predict(combo, singles, base)))
        out.sort(key=lambda cp: -objective(cp[1], self.goal))
        meeting = [cp for cp in out if not cp[1].meets(self.goal)]
        ordered = []
        while meeting:  # quadratic in the predictions, a few hundred: nothing next to one build
            pick = best_of([p for _, p in meeting], self.goal)
            ordered.append(next(cp for cp in meeting if cp[1] is pick))
            meeting = [cp for cp in meeting if cp[1] is not pick]
        return ordered + [cp for cp in out if cp[1].meets(self.goal)]


def run_search(evaluator: Evaluator, space: Space, goal: Goal) -> SearchResult:
    """Run the search and gather its result (the evaluator is closed afterwards)."""
    search = Search(evaluator, space.slots, goal, space.repairs)
    try:
        points, predicted = search.run()
    finally:
        evaluator.close()
    result = SearchResult(goal, points, search.best(), time.perf_counter() - search.start, predicted,
                          space.left_out, search.notes)
    log.info("%s", result)
    return result

