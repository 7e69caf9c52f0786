"""A combination's figures predicted from its single changes' (step 2 of :mod:`.search`).

Every single change was built and measured with the ``default`` clean-ups that every candidate starts with,
so each is taken relative to the base point (the clean-ups alone), not to the original: folding BatchNorm is
counted once in a combination, not once per change.

- Quality losses (``1 - figure``) add; perplexity ratios and size ratios multiply.
- Speed, where the base and every change were costed layer by layer (:mod:`.costs`): Amdahl's law, layer by
  layer. The base's time is its layers' (their share of its measured time, from the latency table) plus a rest
  (what holds no weight: attention's products, activations, Python). A change scales each layer by its own
  ratio (a layer it removes by 0, a layer it adds joins), and the rest by its ratio, read from its measured
  time less its layers'; a combination applies every change's ratios, layer by layer, and adds up. Two changes
  that speed up the same layers compound there only, not over the whole model: int8 matrices after a cut of
  the FFN widths, or a cut of attention heads (the rest) beside int8 layers.
- Otherwise (a change not timed, a profile missing): the speed-ups multiply.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .costs import LayerTimes
from .measure import Point
from .space import Combination, pipeline_of


def predict(combo: Combination, singles: dict[int, Point], base: Point) -> Point:
    """A combination's figures from its single changes' and the base's (see the module docstring)."""
    parts = [singles[id(p)] for p in combo]
    point = Point(str(pipeline_of(combo)), predicted=True, quality_name=base.quality_name)
    if base.quality is not None and all(s.quality is not None for s in parts):
        point.quality = base.quality - sum(base.quality - s.quality for s in parts)  # type: ignore[operator]
    if base.ppl is not None and all(s.ppl is not None for s in parts):
        point.ppl = base.ppl
        for s in parts:
            point.ppl *= s.ppl / base.ppl  # type: ignore[operator]
    point.size = base.size
    for s in parts:
        point.size *= s.size / base.size
    point.speedups = layered_speedups(parts, base) or product_speedups(parts, base)
    return point


def product_speedups(parts: Sequence[Point], base: Point) -> dict[str, float]:
    """Each setting's speed-up: the base's times each change's over the base's."""
    out = {}
    for key, b in base.speedups.items():
        out[key] = b
        for s in parts:
            out[key] *= s.speedups.get(key, b) / b
    return out


def layered_speedups(parts: Sequence[Point], base: Point) -> dict[str, float] | None:
    """Each setting's speed-up by the layer model; None unless the base and every change have a layer profile
    and a measured time at every setting."""
    out = {}
    for key, b in base.speedups.items():
        if key not in base.ms or key not in base.layers or any(key not in s.layers or key not in s.speedups
                                                               for s in parts):
            return None
        relative = layered_time(base.ms[key], base.layers[key], [(b / s.speedups[key], s.layers[key]) for s in parts])
        if relative is None:
            return None
        out[key] = b / relative
    return out


def layered_time(base_ms: float, base: LayerTimes, changes: Sequence[tuple[float, LayerTimes]]) -> float | None:
    """A combination's time over the base's: ``changes`` are each single change's time over the base's (measured
    whole) and its layer times. Layers that cannot be timed alone, in the base or in a change, stay in the rest.
    None when the base has no layer timed alone."""
    names = [n for n, t in base.items() if t is not None and all(c.get(n, 0.0) is not None for _, c in changes)]
    total = sum(base[n] or 0.0 for n in names)
    if total <= 0 or base_ms <= 0:
        return None
    share = min(total / base_ms, 1.0)  # of the base's measured time spent in these layers (isolated: capped)
    rest = 1.0 - share
    layers = {n: base[n] or 0.0 for n in names}
    added = 0.0  # layers a change adds (a block replaced by a linear map), in the table's milliseconds
    for ratio, times in changes:
        new = sum(t for n, t in times.items() if n not in base and t is not None)
        mine = sum(times.get(n) or 0.0 for n in names) + new  # (a layer it removed: absent, 0)
        if 1.0 - share > 0:
            rest *= max(ratio - share * mine / total, 0.0) / (1.0 - share)
        for n in names:
            layers[n] *= (times.get(n) or 0.0) / base[n] if base[n] else 1.0
        added += new
    return rest + share * (sum(layers.values()) + added) / total


def prediction_check(measured: Sequence[tuple[Point, Sequence[Point]]], base: Point) -> str:
    """How near the cost model's speed-ups came to the measured ones of the combinations measured (each with its
    single changes), beside multiplying the changes' whole-model speed-ups: the table checked against
    whole-model timings of the final candidates."""
    layered, product = [], []
    for point, parts in measured:
        guess = layered_speedups(parts, base)
        if point.failed or point.speedup is None or guess is None:
            continue
        layered.append(abs(min(guess.values()) / point.speedup - 1))
        product.append(abs(min(product_speedups(parts, base).values()) / point.speedup - 1))
    if not layered:
        return ""
    return (f"cost model checked on the {len(layered)} combination(s) measured: the worst speed-up predicted layer "
            f"by layer within {100 * statistics.median(layered):.0f}% of the measured (median; worst "
            f"{100 * max(layered):.0f}%), the changes' speed-ups multiplied within "
            f"{100 * statistics.median(product):.0f}% (worst {100 * max(product):.0f}%)")
