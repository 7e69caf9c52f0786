"""LayerMerge's selection: which activations to remove so that a latency budget is met at least loss.

A chain ``l0 -act- l1 -act- ... lk`` (layers joined by activation modules, from :mod:`.links`)
is cut into consecutive segments; a segment's activations are removed and its layers merged into one
(:func:`.layer_math.merged_chain`). Zero padding moves to the segment's first layer, as LayerMerge
does, so the merged layer differs from the linearised chain only at the border, which its importance
counts. Each segment has a cost, the measured latency of its merged layer plus the activation kept
after it (:class:`graphopt.infra.latency_table.LatencyTable`; or its multiply-adds, :class:`.macs_cost.MacsCost`),
and an importance, the normalised output error of the model with only that segment merged, on
calibration data. A dynamic program over the chains, with latency in buckets of 1/400 of the model's,
picks the segments of least total importance whose predicted model latency (the table's sum plus the
measured rest of the model) meets the budget (Kim et al. 2024, LayerMerge, section 4; importance here
is measured without fine-tuning).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphopt.frontend.inputs import as_example_inputs, flatten_outputs
from graphopt.infra.contract import PassResult
from graphopt.infra.latency_table import LatencyTable
from graphopt.infra.metrics import measure_latency
from graphopt.infra.program import Program, swapped_modules

from .layer_math import merged_chain
from .links import GraphLinks
from .macs_cost import MacsCost

log = logging.getLogger(__name__)

BUCKETS = 400


@dataclass
class Chain:
    layers: list[str]
    acts: list[str]  # acts[i] sits between layers[i] and layers[i + 1]
    shapes: list[tuple[int, ...]]  # input shape of each layer


@dataclass
class Segment:
    chain: int
    start: int
    end: int  # inclusive
    cost: float  # ms
    loss: float
    merged: nn.Module | None  # None for a single layer (kept as it is)


def chains_of(links: GraphLinks) -> list[Chain]:
    """Maximal chains of layers joined by activation modules."""
    nxt = {link.a: link for link in links.links if link.act is not None}
    has_prev = {link.b for link in nxt.values()}
    chains = []
    for first in [a for a in nxt if a not in has_prev]:
        chain = Chain([first], [], [nxt[first].shape_a])
        while chain.layers[-1] in nxt:
            link = nxt[chain.layers[-1]]
            chain.layers.append(link.b)
            chain.acts.append(link.act)
            chain.shapes.append(link.shape_b)
        chains.append(chain)
    return chains


def _segment_swaps(chain: Chain, start: int, end: int, merged: nn.Module) -> dict[str, nn.Module]:
    swaps: dict[str, nn.Module] = {chain.layers[start]: merged}
    swaps.update({name: nn.Identity() for name in chain.layers[start + 1:end + 1]})
    swaps.update({name: nn.Identity() for name in chain.acts[start:end]})
    return swaps


def _output_error(model: nn.Module, batches: list, reference: list[list[torch.Tensor]]) -> float:
    err, norm = 0.0, 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            got = flatten_outputs(as_example_inputs(batch).call(model)).values()
            for g, r in zip(got, ref):
                if isinstance(g, torch.Tensor) and g.is_floating_point():
                    err += float((g.float() - r.float()).pow(2).sum())
                    norm += float(r.float().pow(2).sum())
    return err / max(norm, 1e-12)


def _importance(model: nn.Module, swaps: dict[str, nn.Module], batches: list, reference: list) -> float:
    with swapped_modules(model, swaps):
        return _output_error(model, batches, reference)


def _segments(program: Program, chains: list[Chain], table: LatencyTable | MacsCost, batches: list, reference: list,
              merge: Callable) -> list[Segment]:
    model = program.module
    out = []
    for c, chain in enumerate(chains):
        for start, end in itertools.combinations_with_replacement(range(len(chain.layers)), 2):
            kept_act = table.ms(model.get_submodule(chain.acts[end]), chain.shapes[end + 1]) \
                if end < len(chain.acts) else 0.0
            if start == end:
                layer = model.get_submodule(chain.layers[start])
                out.append(Segment(c, start, end, table.ms(layer, chain.shapes[start]) + kept_act, 0.0, None))
                continue
            merged, why = merge([model.get_submodule(n) for n in chain.layers[start:end + 1]], exact=False)
            if merged is None:
                continue
            loss = _importance(model, _segment_swaps(chain, start, end, merged), batches, reference)
            out.append(Segment(c, start, end, table.ms(merged, chain.shapes[start]) + kept_act, loss, merged))
    return out


def _frontier(chain_segments: list[Segment], length: int, unit: float) -> dict[int, tuple[float, list[Segment]]]:
    """Least loss per latency bucket over the ways to cut one chain into segments."""
    best: list[dict[int, tuple[float, list[Segment]]]] = [dict() for _ in range(length + 1)]
    best[0][0] = (0.0, [])
    for end in range(length):
        for seg in (s for s in chain_segments if s.end == end):
            for bucket, (loss, segs) in best[seg.start].items():
                b = bucket + round(seg.cost / unit)
                cand = (loss + seg.loss, [*segs, seg])
                if b not in best[end + 1] or cand[0] < best[end + 1][b][0]:
                    best[end + 1][b] = cand
    return best[length]


def plan(chains: list[Chain], segments: list[Segment], unit: float) -> dict[int, tuple[float, list[Segment]]]:
    """Least total loss per latency bucket over all chains."""
    total: dict[int, tuple[float, list[Segment]]] = {0: (0.0, [])}
    for c, chain in enumerate(chains):
        front = _frontier([s for s in segments if s.chain == c], len(chain.layers), unit)
        combined: dict[int, tuple[float, list[Segment]]] = {}
        for (b1, (l1, s1)), (b2, (l2, s2)) in itertools.product(total.items(), front.items()):
            if b1 + b2 not in combined or l1 + l2 < combined[b1 + b2][0]:
                combined[b1 + b2] = (l1 + l2, s1 + s2)
        total = combined
    return total


def choose_segments(program: Program, latency: float, calib_batches: int, result: PassResult,
                    exact: Callable[..., int], cost: str = "measured") -> None:
    """Remove the activations the DP picks for a predicted latency of ``latency`` x the measured one
    (``cost="macs"``: for multiply-adds of the chains at ``latency`` x theirs)."""
    model = program.module
    chains = chains_of(GraphLinks(program.analyses.get("exported"), model))
    if not chains:
        result.note("", "latency=: no chain of layers joined by activation modules to merge", "warning")
        return
    batches = program.calib_batches(calib_batches)
    with torch.no_grad():
        reference = [[t.detach() for t in flatten_outputs(as_example_inputs(b).call(model)).values()] for b in batches]
    table = LatencyTable() if cost == "measured" else MacsCost()
    measured = measure_latency(model, program.example_inputs, warmup=5, repeat=30) or 0.0
    segments = _segments(program, chains, table, batches, reference, merged_chain)
    table.save()
    singles = sum(s.cost for s in segments if s.start == s.end)  # the chains as they are, in table time
    # the rest of the model, in table time (0 when the table over-estimates small layers, or counts MACs)
    rest = max(0.0, measured - singles) if cost == "measured" else 0.0
    whole = rest + singles
    unit = whole / BUCKETS
    options = plan(chains, segments, unit)
    feasible = {b: v for b, v in options.items() if rest + b * unit <= latency * whole}
    if not feasible:
        fastest = (rest + min(options) * unit) / whole
        raise ValueError(f"merge_layers(latency={latency}): the fastest plan is predicted at {fastest:.2f} x the "
                         f"current latency (chains of {', '.join(str(len(c.layers)) for c in chains)} layers); "
                         f"ask for a latency >= {fastest + 0.01:.2f}")
    bucket = min(feasible, key=lambda b: (feasible[b][0], b))
    loss, chosen = feasible[bucket]
    removed = 0
    for seg in chosen:
        if seg.merged is None:
            continue
        chain = chains[seg.chain]
        for fqn, new in _segment_swaps(chain, seg.start, seg.end, seg.merged).items():
            program.replace_module(fqn, new)
        removed += seg.end - seg.start
        result.note(f"{chain.layers[seg.start]} .. {chain.layers[seg.end]}",
                    f"merged into one layer, activations {', '.join(chain.acts[seg.start:seg.end])} removed "
                    f"(importance {seg.loss:.2e}, predicted {seg.cost:.3f} ms)")
    program.analyses.clear()
    result.stats["layers_merged"] = result.stats.get("layers_merged", 0) + exact(program, result, quiet=True)
    after = measure_latency(program.module, program.example_inputs, warmup=5, repeat=30) or 0.0
    predicted = (rest + bucket * unit) / whole
    result.stats.update(activations_removed=removed, importance_lost=round(loss, 6),
                        predicted_latency=round(predicted, 3),
                        measured_latency=round(after / measured, 3) if measured else 0.0,
                        table_entries_measured=table.measured)
    result.note("", f"LayerMerge: predicted {predicted:.2f} x, measured {after:.2f} of {measured:.2f} ms "
                f"({after / max(measured, 1e-9):.2f} x); {removed} activation(s) removed, importance lost "
                f"{loss:.2e}", "info")
