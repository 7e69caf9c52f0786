"""optimize(goal=...): the search finds what exhaustive search finds, searches a user's pass, reproduces its
answer from the pipeline text, honours max_time, resumes from its cache and explains an infeasible goal."""

import dataclasses
import itertools
import time

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.infra.metrics import count_weight_bytes
from graphopt.infra.registry import PassRegistrationError
from graphopt.search import search_goal
from graphopt.search.goal import Goal
from graphopt.search.measure import Point
from graphopt.search.search import best_of, label

#: the calibrated prune choices: Taylor importance per FLOP a unit costs, readers refit
REFIT = "importance=taylor,allocation=knapsack,reconstruct=true"


def _mlp() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g)
    calib = [torch.randn(8, 64, generator=g) for _ in range(4)]
    held_out = [torch.randn(8, 64, generator=g) for _ in range(4)]
    return model, x, calib, held_out


def test_the_search_finds_the_optimum_that_exhaustive_search_finds():
    model, x, calib, held_out = _mlp()
    goal = Goal(quality=0.85, objective="size", passes=("prune", "quantize"), trials=2, refine=0)  # the listed choices
    base = count_weight_bytes(model)
    prune = [None, *(go.get_pass("prune")(**c) for c in go.get_pass("prune").choices)]
    quant = [None, *(go.get_pass("quantize")(**c) for c in go.get_pass("quantize").choices)]
    exhaustive = {}
    for p, q in itertools.product(prune, quant):  # every pipeline of the space, built and measured
        pipeline = [go.parse_pipeline("default"), *[[c] for c in (p, q) if c is not None]]
        res = go.optimize(model, x, [s for part in pipeline for s in part], calib=calib, eval_data=held_out,
                          measure=False, progress=False)
        exhaustive[str(res.pipeline)] = (res.report.records[-1].quality, count_weight_bytes(res.model) / base)
    feasible = {k: v for k, v in exhaustive.items() if v[0] >= goal.quality}
    smallest = min(size for _, size in feasible.values())  # sizes that cut within goal.tie of the most are equal
    tied = [k for k, (_, size) in feasible.items() if 1 - size >= (1 - goal.tie) * (1 - smallest)]
    truth = max(tied, key=lambda k: feasible[k][0])
    assert len(go.parse_pipeline(truth)) == 4  # the optimum is a combination of two changes, not one

    res = go.optimize_for(model, x, goal, calib=calib, eval_data=held_out, cache=False)
    found = res.search
    assert found.best is not None and found.best.pipeline == truth
    assert str(res.pipeline) == truth
    combos_measured = [p for p in found.points if len(go.parse_pipeline(p.pipeline)) >= 4]
    assert len(combos_measured) <= goal.trials < found.predicted  # it measured fewer than it could have
    assert found.best.quality == pytest.approx(exhaustive[truth][0], abs=1e-6)


@pytest.mark.parametrize("objective, figures, tied, strict", [
    # (quality, speed-up): 1.97x is within 2% of 2.00x, so the better model wins; with tie=0 the faster
    ("speedup", [(0.991, 2.00), (0.998, 1.97), (0.999, 1.90)], 1, 0),
    # (quality, size): a 0.406 cut ties with 0.410 (within 2% of it); 0.99 of the bytes does not tie with 1.0
    ("size", [(0.990, 0.590), (0.995, 0.594), (0.999, 0.620)], 1, 0),
    ("size", [(0.995, 0.992), (1.000, 1.000)], 0, 0),
])
def test_objectives_within_the_tie_go_to_the_better_model(objective, figures, tied, strict):
    points = [Point(f"p{i}", quality=q, size=v if objective == "size" else 1.0,
                    speedups={"b1": v} if objective == "speedup" else {}) for i, (q, v) in enumerate(figures)]
    goal = Goal(quality=0.98, objective=objective)
    assert best_of(points, goal) is points[tied]
    assert best_of(points, dataclasses.replace(goal, tie=0.0)) is points[strict]
    assert best_of([], goal) is None


def test_a_stronger_choice_is_not_measured_once_a_milder_one_misses_the_floor():
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.98,objective=size,passes=[prune],refine=0", calib=calib,
                            eval_data=held_out, cache=False).search  # (refine: tests/search/test_refine.py)
    base = "remove_dropout,fold_bn"
    assert [p.pipeline for p in found.points] == [base, f"{base},prune(target_flops=0.9)",
                                                  f"{base},prune(target_flops=0.9,{REFIT})",
                                                  f"{base},prune(target_flops=0.8,{REFIT})"]
    assert found.points[1].quality < 0.98 <= found.points[2].quality and found.points[3].quality < 0.98
    assert "prune(target_flops=0.8,importance=l2) not measured: the milder prune(target_flops=0.9,importance=l2) " \
           "already misses the quality floor" in found.notes
    assert f"prune(target_flops=0.7,{REFIT}) not measured: the milder prune(target_flops=0.8,{REFIT}) already " \
           "misses the quality floor" in found.notes  # each family of choices stops at its own first miss
    assert found.best is found.points[2]


def test_a_choice_whose_options_change_nothing_on_the_model_is_not_measured_twice():
    model, x, calib, held_out = _mlp()  # no LM head: quantize(lm_head=true) builds what quantize builds
    found = go.optimize_for(model, x, "quality>=0.9,objective=size,passes=[quantize]", calib=calib,
                            eval_data=held_out, cache=False).search
    assert len(found.points) == 5 and not any("lm_head" in p.pipeline for p in found.points)
    assert "quantize(scheme=int8,method=rtn,lm_head=true) not measured: on this model it is " \
           "quantize(scheme=int8,method=rtn) (the model has no vocabulary projection (LM head))" in found.notes
    lm, inputs = hf_model("llama_causal_lm")  # an LM whose head is tied to its table, as SmolLM2's is
    lm.config.tie_word_embeddings, lm.lm_head.weight = True, lm.model.embed_tokens.weight
    g = torch.Generator().manual_seed(3)
    ids = [{"input_ids": torch.randint(0, lm.config.vocab_size, (2, 16), generator=g)} for _ in range(6)]
    found = go.optimize_for(lm, {"input_ids": inputs["input_ids"]}, "quality>=0.9,objective=size,passes=[quantize]",
                            calib=ids[:4], eval_data=ids[4:], cache=False).search
    size = {label(p): p.size for p in found.points}
    assert size["quantize(lm_head=true)"] < size["quantize"] - 0.1  # the tied table packed once, with the head
    assert found.best is not None and "lm_head=true" in found.best.pipeline


def test_the_answer_is_rebuilt_by_its_pipeline_text(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    model, x, calib, held_out = _mlp()
    res = go.optimize(model, x, goal="quality>=0.98,objective=size,passes=[quantize]", calib=calib,
                      eval_data=held_out)
    assert len(list((tmp_path / "search").glob("*.json"))) == 1  # the points, kept for a resumed search
    again = go.optimize(model, x, str(res.pipeline), calib=calib, measure=False)
    assert "quantize" in str(res.pipeline)
    mine, theirs = res.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "remove_dropout,fold_bn" in str(res.pipeline) and res.report.records[-1].latency_ms is not None
    assert res.search.table().count("\n") == len(res.search.points) + 1


class _Sleepy(nn.Module):
    """A layer whose time is a sleep: what the search's timing must see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x


def _sleepy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), _Sleepy(), nn.Linear(16, 16), _Sleepy()).eval()


def _register_wake(scale_noise: bool = False):
    @go.register_pass("wake", tolerance=None, change="wake", stage=30, choices=({"n": 1}, {"n": 2}))
    def wake(program, am, *, n: int = 1):
        """Replace the first n sleeping layers by identities (the second one also nudges the output)."""
        result = go.PassResult(modified=False)
        sleepy = [name for name, m in program.module.named_modules() if isinstance(m, _Sleepy)][:n]
        for name in sleepy:
            program.replace_module(name, nn.Identity())
            result.modified = True
        if n == 2 and scale_noise:
            last = program.module[2]
            program.set_tensor("2.weight", last.weight.detach() + 0.5 * torch.randn_like(last.weight))
        return result

    return wake


def test_a_user_pass_with_choices_joins_the_search_and_the_speedup_is_measured(own_registry):
    _register_wake()
    model = _sleepy_model()
    x, held_out = torch.randn(2, 16), [torch.randn(4, 16)]
    res = go.optimize_for(model, x, "quality>=0.99,passes=[wake],batches=[1,4],threads=[1]", eval_data=held_out,
                          cache=False)
    pipelines = [p.pipeline for p in res.search.points]
    assert "remove_dropout,fold_bn,wake" in pipelines and "remove_dropout,fold_bn,wake(n=2)" in pipelines
    assert str(res.pipeline) == "remove_dropout,fold_bn,wake(n=2)"
    best = res.search.best
    assert set(best.speedups) == {"batch 1, 1 thread", "batch 4, 1 thread"}
    assert best.speedup > 5  # both 20 ms sleeps gone: what is left is two tiny matmuls
    one = next(p for p in res.search.points if p.pipeline.endswith(",wake"))
    assert 1.5 < one.speedup < 2.5  # one of two sleeps gone: about twice as fast


def test_a_speedup_goal_that_costs_too_much_quality_says_which_constraint_binds(own_registry):
    _register_wake(scale_noise=True)
    model = _sleepy_model()
    x, held_out = torch.randn(2, 16), [torch.randn(4, 16)]
    res = go.optimize_for(model, x, "quality>=0.99,speedup>=3,passes=[wake],batches=[1],threads=[1]",
                          eval_data=held_out, cache=False)
    found = res.search
    assert found.best is None
    assert "the nearest, remove_dropout,fold_bn,wake, misses: speed-up" in found.binding
    assert str(res.pipeline) == "default" or str(res.pipeline) == "remove_dropout,fold_bn"
    assert any("optimize(goal=...): no measured point meets" in n for n in res.report.notes)
    noisy = next(p for p in found.points if p.pipeline.endswith("wake(n=2)"))
    assert noisy.quality < 0.99 and noisy.speedups == {}  # not good enough; no repair searched: not timed


def test_registering_choices_that_are_not_options_fails_at_registration(own_registry):
    with pytest.raises(PassRegistrationError, match=r"choice \{'m': 1\} names no option 'm'; valid names: n"):
        @go.register_pass("bad_choices", choices=({"m": 1},))
        def bad(program, am, *, n: int = 1):
            return go.PassResult(modified=False)
    with pytest.raises(PassRegistrationError, match=r"choice \{'ratio': 2\} is not a valid configuration"):
        go.register_pass("prune2", choices=({"ratio": 2},))(type("Prune2", (go.get_pass("prune"),), {}))


def test_max_time_is_honoured_and_the_cache_resumes_without_building_again(tmp_path):
    model, x, calib, held_out = _mlp()
    built = []

    def build(pipeline, **kw):
        built.append(str(pipeline))
        return go.optimize(model, x, pipeline, calib=calib, eval_data=held_out, measure=False, progress=False)

    goal = Goal(quality=0.85, objective="size", passes=("quantize",), max_time=1e-3)
    hurried = search_goal(model, x, goal, build, calib=calib, eval_data=held_out, cache=tmp_path)
    assert len(built) == 1 and any("stopped at max_time=0.001 s" in n for n in hurried.notes)

    goal = Goal(quality=0.85, objective="size", passes=("quantize",))
    first = search_goal(model, x, goal, build, calib=calib, eval_data=held_out, cache=tmp_path)
    assert len(built) == 1 + 4  # the original came from the cache: only the four quantize choices were built
    built.clear()
    second = search_goal(model, x, goal, build, calib=calib, eval_data=held_out, cache=tmp_path)
    assert built == []  # every point read back
    assert second.best.pipeline == first.best.pipeline
    assert [p.quality for p in second.points] == [p.quality for p in first.points]
    other = search_goal(model, x, goal, build, calib=calib[:2], eval_data=held_out, cache=tmp_path)
    assert len(built) == 5 and other.best is not None  # other calibration data: another cache entry


def test_on_onnxruntime_every_candidate_is_exported_and_timed_at_each_batch_size():
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x[:1], "quality>=0.9,runtime=onnxruntime,batches=[1,16],threads=[1],"
                            "passes=[quantize],trials=0,plans=0", calib=calib, eval_data=held_out, cache=False).search
    assert len(found.points) == 5 and not [p.error for p in found.points if p.failed]
    assert all(set(p.speedups) == {"batch 1, 1 thread", "batch 16, 1 thread"} for p in found.points)
    assert all(0.05 < s < 20 for p in found.points for s in p.speedups.values())


def test_a_point_cached_without_timing_is_timed_when_a_later_goal_needs_speed(tmp_path):
    model, x, calib, held_out = _mlp()
    sized = go.optimize_for(model, x, "quality>=0.9,objective=size,passes=[quantize],batches=[1],threads=[1]",
                            calib=calib, eval_data=held_out, cache=tmp_path).search
    assert all(p.speedups == {} for p in sized.points)
    timed = go.optimize_for(model, x, "quality>=0.9,passes=[quantize],batches=[1],threads=[1]", calib=calib,
                            eval_data=held_out, cache=tmp_path).search
    assert all(set(p.speedups) == {"batch 1, 1 thread"} for p in timed.points)
    assert timed.best is not None and timed.best.speedup is not None



def test_a_candidate_whose_own_passes_changed_nothing_reuses_the_figures_of_the_same_model(monkeypatch):
    from graphopt.search.measure import Evaluator

    timed = []
    timing = Evaluator._timed
    monkeypatch.setattr(Evaluator, "_timed", lambda self, m: timed.append(m) or timing(self, m))
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.9,passes=[drop_blocks,quantize],batches=[1],threads=[1]",
                            calib=calib, eval_data=held_out, cache=False).search
    base, dropped = found.points[0], next(p for p in found.points if "drop_blocks" in p.pipeline)
    assert dropped.unchanged[-1].startswith("drop_blocks")  # an MLP has no blocks to drop
    assert dropped.speedups == base.speedups and dropped.quality == base.quality
    assert len(timed) == len(found.points) - 1  # drop_blocks was built but not timed: the original was
    assert "drop_blocks(n=1) changed nothing on this model: left out of the combinations" in found.notes
    assert "drop_blocks(n=2) not measured: drop_blocks(n=1) changed nothing on this model" in found.notes
    assert not any("drop_blocks" in p.pipeline and "quantize" in p.pipeline for p in found.points)


def test_a_choice_that_misses_the_floor_ends_only_the_stronger_choices_of_its_own_family(own_registry):
    @go.register_pass("jitter", tolerance=None, change="jitter", stage=30,
                      choices=({"where": "0", "scale": 1.0}, {"where": "0", "scale": 2.0}, {"where": "4", "scale": 0.0}))
    def jitter(program, am, *, where: str = "0", scale: float = 1.0):
        """Add scaled noise to the weight of layer ``where`` (scale 0: leave it, but say it changed)."""
        w = program.module.get_submodule(where).weight
        program.set_tensor(f"{where}.weight", w.detach() + scale * torch.randn_like(w))
        return go.PassResult(modified=True)

    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.99,objective=size,passes=[jitter]",
                            eval_data=held_out, cache=False).search
    measured = [p.pipeline.removeprefix("remove_dropout,fold_bn,") for p in found.points]
    assert "jitter" in measured and "jitter(where='4',scale=0.0)" in measured  # another family: measured
    assert not any("scale=2.0" in p for p in measured)  # a stronger cut of the one that missed: not measured
    assert any("jitter(scale=2.0) not measured: the milder jitter already misses" in n for n in found.notes)


def test_single_changes_are_measured_breadth_first_so_max_time_reaches_every_family(own_registry, monkeypatch):
    from graphopt.search.search import Search

    for name in ("alpha", "beta"):
        @go.register_pass(name, tolerance=None, change=name, stage=30, choices=({"scale": 0.01}, {"scale": 0.02}))
        def nudge(program, am, *, scale: float = 0.01):
            """Add a little noise to the first layer's weight."""
            w = program.module[0].weight
            program.set_tensor("0.weight", w.detach() + scale * torch.randn_like(w))
            return go.PassResult(modified=True)

    model, x, calib, held_out = _mlp()
    monkeypatch.setattr(Search, "_out_of_time", lambda self: len(self.points) >= 3)  # the original and two
    found = go.optimize_for(model, x, "quality>=0.9,objective=size,passes=[alpha,beta]", eval_data=held_out,
                            cache=False).search
    built = [label(p) for p in found.points]
    assert built == ["original", "alpha", "beta"]  # slot by slot it would be alpha twice, no beta
    assert "stopped at max_time=1800 s before alpha(scale=0.02)" in found.notes


def test_a_candidate_under_the_floor_is_timed_only_when_a_repair_may_lift_it(own_registry, tmp_path):
    _register_wake(scale_noise=True)

    @go.register_pass("mend", tolerance=None, stage=80, repairs=True)
    def mend(program, am):
        """A repair that finds nothing to mend."""
        return go.PassResult(modified=False)

    model = _sleepy_model()
    x, held_out = torch.randn(2, 16), [torch.randn(4, 16)]
    goal = "quality>=0.99,speedup>=3,passes=[wake,mend],batches=[1],threads=[1],heal={}"
    found = go.optimize_for(model, x, goal.format(0), eval_data=held_out, cache=tmp_path).search
    noisy = next(p for p in found.points if p.pipeline.endswith("wake(n=2)"))
    assert noisy.quality < 0.99 and noisy.speedups == {}  # nothing would repair it: its speed changes nothing
    assert "speed-up not timed: it misses the quality floor, and no repair is tried on it" in noisy.meets(found.goal)
    assert next(p for p in found.points if p.pipeline.endswith(",wake")).speedup > 1.5  # meets the floor: timed
    again = go.optimize_for(model, x, goal.format(1), eval_data=held_out, cache=tmp_path).search
    noisy = next(p for p in again.points if p.pipeline.endswith("wake(n=2)"))
    assert noisy.speedup > 3 and not noisy.untimed  # a repair may lift it, if it is fast enough: timed now
