"""The search space, as the passes declare it: slots of alternative choices, and the pipelines they make.

Each registered pass with ``choices`` (:class:`~graphopt.infra.contract.Pass`) offers its option sets; the
passes that share a ``slot`` are alternatives (``drop_blocks(n=1)`` or ``replace_blocks(n=2)``, never both);
a candidate takes at most one choice per slot, and its pipeline puts them in ``stage`` order after the exact
clean-ups of the ``default`` preset. A user's pass registered with ``choices=`` joins the space as it is.
A pass registered with ``repairs=True`` (``heal``) is no choice: the search adds it, in its stage, to the
measured candidates whose quality floor binds.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..infra.contract import Pass
from ..infra.pipeline import Pipeline, parse_pipeline
from ..infra.registry import get_pass, list_passes
from .goal import GoalError


@dataclass(frozen=True)
class Slot:
    """Alternative configured passes, one of which (or none) a candidate takes."""

    name: str
    stage: int
    choices: tuple[Pass, ...]


#: a candidate: the chosen pass of each slot that takes one, in slot order
Combination = tuple[Pass, ...]


@dataclass(frozen=True)
class Space:
    """What a goal searches: the slots, the repairing passes (``heal``) and what was left out, with why."""

    slots: list[Slot]
    repairs: list[Pass]
    left_out: list[str]


def declared_space(passes: Sequence[str] = (), *, calibrated: bool) -> Space:
    """The slots of every pass that declares choices and the repairing passes (or those of ``passes`` only).

    Passes that read calibration data are left out when there is none (said in ``left_out``)."""
    registry = list_passes()
    if passes:
        for name in passes:
            cls = get_pass(name)  # an unknown name raises with the closest one
            if cls.choices is None and not cls.repairs:
                searchable = sorted(n for n, c in registry.items() if c.choices is not None or c.repairs)
                raise GoalError(f"passes=[{name}]: {name} declares no choices to search; searchable passes: "
                                f"{', '.join(searchable)} (register_pass(..., choices=...) adds one)")
    chosen = [registry[n] for n in passes] if passes else list(registry.values())
    repairs: list[Pass] = []
    left_out: list[str] = []
    for cls in sorted((c for c in chosen if c.repairs), key=lambda c: c.stage):
        if cls.needs_calibration and not calibrated:
            left_out.append(f"{cls.name} (reads calibration data: give calib=)")
        else:
            repairs.append(cls())
    chosen = [c for c in chosen if c.choices is not None]
    slots: dict[str, list[Pass]] = {}
    stages: dict[str, int] = {}
    for cls in chosen:
        slot = cls.slot or cls.name
        for options in cls.choices or ():
            p = cls(**options)
            if p.needs_calibration and not calibrated:
                left_out.append(f"{p.label()} (reads calibration data: give calib=)")
                continue
            slots.setdefault(slot, []).append(p)
            stages[slot] = min(stages.get(slot, cls.stage), cls.stage)
    ordered = sorted(slots, key=lambda s: (stages[s], s))
    return Space([Slot(s, stages[s], tuple(slots[s])) for s in ordered], repairs, left_out)


def combinations(slots: Sequence[Slot]) -> Iterator[Combination]:
    """Every candidate: none or one choice per slot (the empty one, the original, first)."""
    for picks in itertools.product(*[(None, *slot.choices) for slot in slots]):
        yield tuple(p for p in picks if p is not None)


def pipeline_of(combo: Combination) -> Pipeline:
    """The pipeline that builds a candidate: the ``default`` clean-ups, then its passes by stage."""
    return Pipeline([*parse_pipeline("default"), *sorted(combo, key=lambda p: type(p).stage)])


def family(choice: Pass) -> tuple[Any, ...]:
    """Choices of one pass that differ only in numbers, set or not (``prune`` ratios, blocks dropped, an int4
    bits budget): listed mildest first, each is a stronger cut of the one before. Choices that differ in anything else (``quantize``'s
    ``int8`` weight-only and ``w8a8``) are not ordered by strength, and one missing the floor says nothing
    of the other."""
    fixed = [(f.name, repr(getattr(choice, f.name))) for f in dataclasses.fields(choice)
             if isinstance(getattr(choice, f.name), bool)
             or not isinstance(getattr(choice, f.name), (int, float, type(None)))]  # (None: a number left unset)
    return (type(choice), *fixed)


def midpoint(mild: Pass, strong: Pass) -> Pass | None:
    """The choice halfway between two of one :func:`family` (each option that differs averaged, integers rounded
    down); None when no value lies between them or the pass refuses it."""
    if family(mild) != family(strong):
        return None
    halfway: dict[str, Any] = {}
    for f in dataclasses.fields(mild):
        a, b = getattr(mild, f.name), getattr(strong, f.name)
        if a == b:
            continue
        if not (_is_number(a) and _is_number(b)):
            return None  # (an option set in one and unset in the other: budget_bits=6 against all-int4)
        mid = (a + b) // 2 if isinstance(a, int) and isinstance(b, int) else round((a + b) / 2, 6)
        if mid in (a, b):
            return None
        halfway[f.name] = mid
    try:
        return dataclasses.replace(mild, **halfway) if halfway else None
    except ValueError:  # out of the option's declared range
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def without(choice: Pass, options: Sequence[str]) -> Pass:
    """``choice`` with ``options`` back at their defaults."""
    defaults = type(choice)().options(all=True)
    return dataclasses.replace(choice, **{name: defaults[name] for name in options})
