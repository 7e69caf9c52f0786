"""Per-layer plans: a pass's value chosen layer by layer against the goal's floor (graphopt/search/layerwise.py).

The knapsack finds what enumeration finds; on a model with one layer int4 cannot hold, the plan the search measures
is the smallest model that exhaustive search over every per-layer assignment finds, and its pipeline text rebuilds
it; a user's pass with a per-layer knob is planned too, its layers costed from the latency table without being
built."""

import dataclasses
import fnmatch
import itertools
import random
import time
from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt as go
from graphopt.analysis.layers import weight_rows
from graphopt.infra.metrics import count_weight_bytes
from graphopt.search.layerwise import BINS, Unit, compressed, knapsack
from tests.search.test_search import _mlp


@pytest.mark.parametrize("seed", range(5))
def test_the_knapsack_finds_what_enumeration_finds(seed):
    rng = random.Random(seed)
    budget = 1.0
    units = []
    for _ in range(6):  # losses on the knapsack's grid, so rounding them up changes nothing
        values = {"float": (0.0, 0.0), "int8": (rng.randint(0, 60) / BINS, -rng.uniform(1, 2)),
                  "int4": (rng.randint(40, 250) / BINS, -rng.uniform(2, 4))}
        units.append(Unit([f"u{len(units)}"], loss={v: lc[0] for v, lc in values.items()},
                          cost={v: lc[1] for v, lc in values.items()}))
    best = None
    for pick in itertools.product(*[list(u.cost) for u in units]):
        loss = sum(u.loss[v] for u, v in zip(units, pick))
        cost = sum(u.cost[v] for u, v in zip(units, pick))
        if loss <= budget + 1e-12 and (best is None or cost < best[0] - 1e-12):
            best = (cost, pick)
    chosen = knapsack(units, budget)
    assert chosen is not None
    assert sum(u.loss[v] for u, v in zip(units, chosen)) <= budget + 1e-12
    assert sum(u.cost[v] for u, v in zip(units, chosen)) == pytest.approx(best[0])
    assert len(set(chosen)) > 1  # (a mixed answer: the instance is not trivial)


def test_a_knapsack_with_no_assignment_within_the_budget_says_so():
    units = [Unit(["a"], loss={"int4": 0.5}, cost={"int4": -1.0})]
    assert knapsack(units, 0.1) is None
    assert knapsack(units, 0.5) == ["int4"]


def test_globs_stand_for_the_units_and_blocks_that_agree_and_give_every_layer_its_value():
    attn = [f"m.layers.{i}.self.{p}_proj" for i in range(3) for p in "qkvo"]
    plan = {"m.layers.0.attn.q": "int8", "m.layers.1.attn.q": "int8", "m.layers.0.q": "int8", "m.layers.1.q": "int4",
            "m.layers.0.mlp.down": "int4", "m.layers.1.mlp.down": "int4", "head": "float",
            **{n: "int4" if n.endswith("o_proj") or ".2." in n else "int8" for n in attn},
            "m.layers.0.mlp.gate_proj": "int8", "m.layers.0.mlp.up_proj": "int8", "m.layers.0.mlp.down_proj": "int4"}
    units = [[f"m.layers.{i}.self.{p}_proj" for p in "qkv"] for i in range(3)] + [["m.layers.0.mlp.gate_proj",
                                                                                   "m.layers.0.mlp.up_proj"]]
    out = compressed(plan, "int4", units)
    assert out == {"m.layers.*.attn.q": "int8", "m.layers.0.q": "int8", "head": "float",  # (*.q matches attn.q)
                   "m.layers.0.self.[kqv]_proj": "int8", "m.layers.1.self.[kqv]_proj": "int8",  # (o_proj: int4)
                   "m.layers.*.mlp.gate_proj": "int8", "m.layers.*.mlp.up_proj": "int8"}  # (*_proj: down_proj too)
    mlp = {f"L.{i}.mlp.{p}_proj": "int8" if i == 0 else "int4" for i in range(2) for p in ("gate", "up", "down")}
    covered = compressed(mlp, "int4", [["L.0.mlp.gate_proj", "L.0.mlp.up_proj"], ["L.0.mlp.down_proj"]])
    assert covered == {"L.0.mlp.*_proj": "int8"}  # (down_proj's own name: covered by its block's glob)
    layer_by_layer = compressed(plan, "int4")
    assert "m.layers.0.self.k_proj" in layer_by_layer and "m.layers.*.self.q_proj" not in layer_by_layer
    for globs in (out, layer_by_layer):
        for name, value in plan.items():  # the pass's rule: the last glob that matches wins, else the main value
            assert next((v for g, v in reversed(globs.items()) if fnmatch.fnmatchcase(name, g)), "int4") == value


def _outlier_mlp():
    model, x, calib, held_out = _mlp()
    with torch.no_grad():
        model[2].weight[:, ::32] *= 25  # a few large weights in every row: int4's groups lose the rest of layer 2
    return model, x, calib, held_out


def test_the_plan_is_the_smallest_model_that_exhaustive_search_over_layers_finds():
    model, x, calib, held_out = _outlier_mlp()
    floor = 0.99
    base = count_weight_bytes(model)
    exhaustive = {}
    for values in itertools.product(["float", "int8", "int4"], repeat=3):  # every layer's value, built and measured
        layers = {name: v for name, v in zip(["0", "2", "4"], values)}
        res = go.optimize(model, x, [go.get_pass("quantize")(scheme="int4", method="gptq", layers=layers)],
                          calib=calib, eval_data=held_out, measure=False, progress=False)
        exhaustive[values] = (res.report.records[-1].quality, count_weight_bytes(res.model) / base)
    feasible = {k: v for k, v in exhaustive.items() if v[0] >= floor}
    truth = min(feasible, key=lambda k: feasible[k][1])
    assert truth == ("int4", "int8", "int4")  # layer 2 alone needs 8 bits
    assert exhaustive[("int4", "int4", "int4")][0] < floor  # all-int4 misses the floor

    res = go.optimize_for(model, x, f"quality>={floor},objective=size,passes=[quantize],refine=0", calib=calib,
                          eval_data=held_out, cache=False)
    best = res.search.best
    assert "layers=" in best.pipeline and best.quality >= floor
    assert best.size == pytest.approx(feasible[truth][1], rel=0.02)
    uniform = [p for p in res.search.points if "layers=" not in p.pipeline and "budget_bits" not in p.pipeline]
    assert all(p.size > best.size for p in uniform if p.quality >= floor)  # smaller than every uniform choice
    int4 = next(p for p in res.search.points if p.pipeline.endswith("quantize(scheme=int4,method=gptq)"))
    assert int4.quality < floor  # measured although its milder budget_bits=6 choice missed: the plans read it
    assert any(n.startswith("per-layer plan quantize(") and "predicted" in n for n in res.search.notes)
    int8, w8a8 = (next(p for p in res.search.points if p.pipeline.endswith(end))
                  for end in (",quantize", "quantize(scheme=w8a8,method=gptq)"))
    assert int8.size == w8a8.size and int8.quality != w8a8.quality
    worse = "quantize(scheme=int8,method=rtn)" if int8.quality < w8a8.quality else "quantize(scheme=w8a8,method=gptq)"
    left = [n for n in res.search.notes if "left out" in n]
    assert len(left) == 1 and left[0].startswith(f"per-layer plans: {worse} left out")  # as small, lost more
    again = go.optimize(model, x, str(res.pipeline), calib=calib, progress=False)
    assert torch.equal(again.model(held_out[0]), res.model(held_out[0]))  # the text rebuilds the model


def test_no_plans_are_measured_with_plans_0():
    model, x, calib, held_out = _outlier_mlp()
    found = go.optimize_for(model, x, "quality>=0.99,objective=size,passes=[quantize],refine=0,plans=0",
                            calib=calib, eval_data=held_out, cache=False).search
    assert not any("layers=" in p.pipeline for p in found.points)
    assert not any(p.pipeline.endswith("quantize(scheme=int4,method=gptq)") for p in found.points)  # floor rule


class _Nap(nn.Module):
    """A linear layer that sleeps ``ms`` first: a slow kernel, or (1 ms) its quick variant."""

    def __init__(self, weight: torch.Tensor, ms: float) -> None:
        super().__init__()
        self.weight, self.ms = nn.Parameter(weight), ms

    def forward(self, x):
        time.sleep(self.ms / 1e3)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"ms={self.ms}"  # (the latency table keys a layer by its repr: each sleep its own entry)


def _register_nap():
    @go.register_pass("nap", tolerance=None, change="nap", stage=60, choices=({"mode": "slow"}, {"mode": "quick"}))
    @dataclasses.dataclass
    class Nap(go.Pass):
        """Swap each slow layer for a quick one whose weights are rounded to steps of 0.1."""

        per_layer: ClassVar[tuple[str, ...]] = ("layers", "mode")
        layer_unchanged: ClassVar[str] = "slow"
        mode: Literal["slow", "quick"] = "slow"
        layers: dict = dataclasses.field(default_factory=dict)

        def run(self, program, am):
            result = go.PassResult(modified=False)
            for names in self.layer_units(program):
                value = next((v for g, v in reversed(self.layers.items()) if fnmatch.fnmatchcase(names[0], g)),
                             self.mode)
                if value == "quick":
                    program.replace_module(names[0], self.layer_variant(program, names[0], value))
                    result.modified = True
            return result

        def layer_value(self):
            return None if self.layers else self.mode

        def layer_units(self, program):
            return [[n] for n, m in program.module.named_modules() if isinstance(m, _Nap) and m.ms > 1]

        def layer_variant(self, program, name, value):
            layer = program.get_submodule(name)
            return layer if value == "slow" else _Nap((layer.weight.detach() * 10).round() / 10, 1.0)

        def layer_error(self, program, name, value):
            layer = program.get_submodule(name)
            return weight_rows(layer, layer.weight.detach() - self.layer_variant(program, name, value).weight)

    return Nap


def test_a_users_pass_with_a_per_layer_knob_is_planned_and_costed_from_the_latency_table(own_registry):
    _register_nap()
    torch.manual_seed(0)
    scales = [0.2, 3.0, 3.0]  # steps of 0.1 ruin the small weights of the first layer, not the others
    model = nn.Sequential(*[_Nap(torch.randn(16, 16) * s / 4, 15.0) for s in scales]).eval()
    x, held_out, calib = torch.randn(2, 16), [torch.randn(8, 16)], [torch.randn(8, 16) for _ in range(2)]
    goal = "quality>=0.99,passes=[nap],batches=[1],threads=[1],refine=0,confirm=0"
    res = go.optimize_for(model, x, goal, calib=calib, eval_data=held_out, cache=False)
    points = {p.pipeline.removeprefix("remove_dropout,fold_bn,"): p for p in res.search.points}
    assert points["nap(mode=quick)"].quality < 0.99 <= points["nap"].quality  # all quick misses; none does nothing
    plan = res.search.best
    assert plan.pipeline.endswith("nap(mode=quick,layers={'0':slow})")  # the two insensitive layers quick
    assert plan.quality >= 0.99 and plan.speedup > 2  # 45 ms of sleep -> 17
    note = next(n for n in res.search.notes if n.startswith("per-layer plan nap("))
    predicted = float(note.split("predicted ")[1].split("x")[0].split(", ")[-1])
    assert predicted == pytest.approx(plan.speedup, rel=0.25)  # costed from the table, before it was built


def test_uniform_choices_the_plans_read_are_timed_under_the_floor_and_only_then():
    model, x, calib, held_out = _outlier_mlp()
    goal = "quality>=0.99999,passes=[quantize],batches=[1],threads=[1],refine=0,confirm=0"
    for plans in (2, 0):
        found = go.optimize_for(model, x, f"{goal},plans={plans}", calib=calib, eval_data=held_out, cache=False).search
        w8a8 = next(p for p in found.points if p.pipeline.endswith("quantize(scheme=w8a8,method=gptq)"))
        assert w8a8.quality < 0.99999  # under the floor: timed only for the plans, whose speed it spreads
        assert bool(w8a8.speedups) == (plans > 0), plans
