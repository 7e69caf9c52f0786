"""The search's refinement: a choice measured halfway between a family's last choice that meets the quality floor
and the next, which misses it, so the search finds the cut the floor allows, not only the listed ones."""

import graphopt as go
from graphopt.search.space import midpoint
from tests.search.test_search import REFIT, _mlp


def test_the_midpoint_of_two_choices_of_one_family():
    prune, drop, quantize = go.get_pass("prune"), go.get_pass("drop_blocks"), go.get_pass("quantize")
    assert midpoint(prune(target_flops=0.9), prune(target_flops=0.8)) == prune(target_flops=0.85)
    assert midpoint(drop(n=1), drop(n=3)) == drop(n=2)
    assert midpoint(drop(n=1), drop(n=2)) is None  # no integer between them
    assert midpoint(quantize(scheme="int4", budget_bits=6), quantize(scheme="int4")) is None  # set against unset
    assert midpoint(quantize(scheme="int8"), quantize(scheme="int4")) is None  # not one family
    assert midpoint(prune(target_flops=0.9), prune(target_flops=0.8, importance="taylor")) is None


def test_the_search_bisects_a_cut_between_the_floor_it_meets_and_the_one_it_misses():
    model, x, calib, held_out = _mlp()
    goal = "quality>=0.985,objective=size,passes=[prune]"
    listed = go.optimize_for(model, x, goal + ",refine=0", calib=calib, eval_data=held_out, cache=False).search
    found = go.optimize_for(model, x, goal + ",refine=2", calib=calib, eval_data=held_out, cache=False).search
    base = "remove_dropout,fold_bn"
    by_flops = {float(p.pipeline.split("target_flops=")[1].split(",")[0]): p for p in found.points
                if p.pipeline.startswith(f"{base},prune(") and REFIT in p.pipeline}
    assert sorted(by_flops) == [0.8, 0.825, 0.85, 0.9]  # 0.85 met the floor, so the next bisection is below it
    assert by_flops[0.9].quality >= 0.985 > by_flops[0.8].quality
    assert by_flops[0.85].quality >= 0.985 > by_flops[0.825].quality
    assert f"prune(target_flops=0.85,{REFIT}) measured between prune(target_flops=0.9,{REFIT}), which meets the " \
           f"quality floor, and prune(target_flops=0.8,{REFIT}), which misses it" in found.notes
    assert found.best is by_flops[0.85] and found.best.size < listed.best.size
    assert listed.best.pipeline == f"{base},prune(target_flops=0.9,{REFIT})"
    assert not any("0.85" in p.pipeline for p in listed.points)


def test_a_refined_choice_joins_the_combinations():
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.985,objective=size,passes=[prune,quantize]", calib=calib,
                            eval_data=held_out, cache=False).search
    refined = [n.split(" measured between")[0] for n in found.notes if " measured between " in n]
    assert refined
    combined = [p for p in found.points if "quantize" in p.pipeline and any(r in p.pipeline for r in refined)]
    assert combined  # a combination with a refined cut was predicted to be among the best and measured
