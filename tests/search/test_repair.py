"""The search's repair step: candidates whose quality floor binds are measured again with heal (or a user's
repairing pass), and a user's metric(model) ranks candidates instead of the report's figure."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.infra.registry import PassRegistrationError
from graphopt.search import GoalError
from tests.search.test_search import REFIT, _mlp, _register_wake, _sleepy_model


def test_heal_lifts_a_pruned_model_over_the_floor_that_pruning_alone_misses():
    model, x, calib, held_out = _mlp()
    goal = "quality>=0.93,objective=size,passes=[prune,heal],heal=2"
    found = go.optimize_for(model, x, goal, calib=calib, eval_data=held_out, cache=False).search
    pruned = next(p for p in found.points if p.pipeline.endswith("prune(target_flops=0.8)"))
    healed = next(p for p in found.points if p.pipeline == pruned.pipeline + ",heal")
    assert pruned.quality < 0.93 <= healed.quality  # prune misses the floor; healed, the same model meets it
    assert healed.size == pytest.approx(pruned.size)  # heal trains weights, it removes nothing
    refit = next(p for p in found.points if p.pipeline.endswith(f"prune(target_flops=0.7,{REFIT})"))
    assert refit.quality >= 0.93 and refit.size < healed.size  # the refit cut meets the floor unhealed, smaller
    assert found.best is refit
    without = go.optimize_for(model, x, goal.replace("heal=2", "heal=0"), calib=calib, eval_data=held_out,
                              cache=False).search
    assert not any("heal" in p.pipeline for p in without.points)
    assert without.best.pipeline == refit.pipeline


def test_a_healed_cut_that_meets_the_floor_leads_to_its_stronger_cut_healed():
    model, x, calib, held_out = _mlp()
    goal = "quality>=0.9,objective=size,passes=[prune,heal],heal=2"
    found = go.optimize_for(model, x, goal, calib=calib, eval_data=held_out, cache=False).search
    base = "remove_dropout,fold_bn"
    assert f"{base},prune(target_flops=0.7)" not in [p.pipeline for p in found.points]  # the floor rule's cut
    milder = next(p for p in found.points if p.pipeline == f"{base},prune(target_flops=0.8),heal")
    stronger = next(p for p in found.points if p.pipeline == f"{base},prune(target_flops=0.7),heal")
    assert milder.quality >= 0.9 and stronger.quality >= 0.9 and stronger.size < milder.size
    assert found.best is stronger  # smaller than the refit 0.7 cut, the answer without the climb
    assert "prune(target_flops=0.8),heal meets the floor: heal(recipe=auto) tried on prune(target_flops=0.7), " \
           "which the floor rule left out" in found.notes


def test_a_searched_pass_list_without_heal_heals_nothing():
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.955,objective=size,passes=[prune]", calib=calib,
                            eval_data=held_out, cache=False).search
    assert not any("heal" in p.pipeline for p in found.points)


def _register_denoise():
    @go.register_pass("denoise", tolerance=None, stage=80, repairs=True)
    def denoise(program, am):
        """Put the original's weights back into layer 2 (what wake(n=2) perturbed)."""
        program.set_tensor("2.weight", program.original[2].weight.detach().clone())
        return go.PassResult(modified=True)

    denoise.needs_original = True
    return denoise


def test_a_users_repairing_pass_is_added_to_the_fast_candidate_that_misses_the_floor(own_registry):
    _register_wake(scale_noise=True)
    _register_denoise()
    model = _sleepy_model()
    x, held_out = torch.randn(2, 16), [torch.randn(4, 16)]
    goal = "quality>=0.99,speedup>=3,passes=[wake,denoise],batches=[1],threads=[1]"
    found = go.optimize_for(model, x, goal, eval_data=held_out, cache=False).search
    noisy = next(p for p in found.points if p.pipeline.endswith("wake(n=2)"))
    assert noisy.quality < 0.99 and noisy.speedup > 3
    assert found.best is not None and found.best.pipeline == noisy.pipeline + ",denoise"
    assert found.best.quality == pytest.approx(1.0, abs=1e-5) and found.best.speedup > 3
    # the one-sleep candidate misses the speed-up, which no repair changes: it is not repaired
    assert not any(p.pipeline.endswith(",wake,denoise") for p in found.points)


def test_the_repair_is_not_tried_on_a_candidate_it_cannot_help(own_registry):
    _register_denoise()
    model, x, calib, held_out = _mlp()
    found = go.optimize_for(model, x, "quality>=0.9999,objective=size,passes=[quantize,denoise]", calib=calib,
                            eval_data=held_out, cache=False).search
    assert not any("denoise" in p.pipeline for p in found.points)  # quantize's stage comes after denoise's
    assert any("denoise: no measured candidate misses only the quality floor" in n for n in found.notes)


def test_a_repairing_pass_cannot_also_declare_choices(own_registry):
    with pytest.raises(PassRegistrationError, match="a repairing pass has no choices"):
        @go.register_pass("fixer", repairs=True, choices=({"n": 1},))
        def fixer(program, am, *, n: int = 1):
            return go.PassResult(modified=False)


def _agreement_metric(held_out: list[torch.Tensor], labels: list[torch.Tensor]):
    def agreement(model: nn.Module) -> float:
        """Share of held-out samples whose argmax is the original's (the user's own figure)."""
        hits = sum(int((model(b).argmax(-1) == y).sum()) for b, y in zip(held_out, labels))
        return hits / sum(len(y) for y in labels)

    return agreement


def test_a_users_metric_ranks_the_candidates_without_eval_data():
    model, x, calib, held_out = _mlp()
    with torch.no_grad():  # labels: the original's argmax, a quarter of them wrong (its accuracy is 0.75)
        labels = [torch.where(torch.arange(len(b)) % 4 == 0, model(b).argmax(-1) + 1, model(b).argmax(-1))
                  for b in held_out]
    metric = _agreement_metric(held_out, labels)
    res = go.optimize(model, x, goal="quality>=0.9,objective=size,passes=[quantize]", calib=calib, metric=metric)
    found = res.search
    assert all(p.quality_name == "agreement / original" for p in found.points)
    with torch.no_grad():
        assert metric(model) == 0.75
        assert found.points[0].quality == 1.0  # the original, over itself
        assert found.best.quality == pytest.approx(metric(res.model) / 0.75)  # the model returned, over the original
    assert any(p.quality < 1.0 for p in found.points)  # it does tell candidates apart
    assert found.best.size < 0.5


def test_a_metric_that_is_not_positive_on_the_original_stops_the_search():
    model, x, calib, held_out = _mlp()
    with pytest.raises(GoalError, match=r"metric\(original\) = -1.0: the metric must be higher-is-better and "
                                        r"positive"):
        go.optimize(model, x, goal="quality>=0.9,objective=size,passes=[quantize]", calib=calib,
                    metric=lambda m: -1.0)
    with pytest.raises(GoalError, match="metric= ranks the candidates of a goal search: give goal= too"):
        go.optimize(model, x, "default", metric=lambda m: 1.0)
    with pytest.raises(GoalError, match="metric= takes a function model -> float"):
        go.optimize(model, x, goal="quality>=0.9,objective=size,passes=[quantize]", calib=calib, metric=0.5)


def test_a_model_in_training_mode_is_searched_in_eval_mode_and_handed_back_unchanged():
    model, x, calib, held_out = _mlp()
    model = nn.Sequential(*model[:2], nn.Dropout(0.5), *model[2:]).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    found = go.optimize_for(model, x, "quality>=0.99,objective=size,passes=[quantize]", calib=calib,
                            eval_data=held_out, cache=False).search
    assert found.points[0].quality == pytest.approx(1.0)  # the reference ran without dropout, as candidates do
    assert found.best is not None and "quantize" in found.best.pipeline
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
