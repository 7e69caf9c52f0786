"""heal's schedule: held-out early stopping keeps the best point, recipes per kind of change, progressive passes."""

import pytest
import torch

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.passes.heal.recipes import LM_RECIPES, RECIPES, change_kind, is_language_model
from graphopt.passes.heal.run import HealRun

from .heal_data import token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(model, n=10, seed=0):
    return token_batches(model, n, seed)


@torch.no_grad()
def _error(reference, model, calib):
    """Normalised squared error of the outputs (last hidden states, pooled output) over ``calib``."""
    errors = []
    for b in calib:
        want, got = reference(**b), model(**b)
        for key in ("last_hidden_state", "pooler_output"):
            errors.append(float((got[key] - want[key]).pow(2).mean() / want[key].pow(2).mean()))
    return sum(errors) / len(errors)


def _record(res, name="heal"):
    rec = next(r for r in reversed(res.report.records) if r.name == name)
    assert rec.status == "ok", rec.reason
    return rec


def test_held_out_batches_are_never_trained_on(monkeypatch):
    model, inputs = hf_model("bert", layers=2)
    seen: list[tuple[int, bool]] = []
    loss = HealRun.loss

    def spy(self, index):
        seen.append((index, torch.is_grad_enabled()))
        return loss(self, index)

    monkeypatch.setattr(HealRun, "loss", spy)
    res = go.optimize(model, inputs, "dyt,heal(steps=25,lr=1e-3,holdout=0.2,eval_every=5)", calib=_calib(model),
                      measure=False, on_error="raise")
    rec = _record(res)
    trained = {i for i, grad in seen if grad}
    checked = {i for i, grad in seen if not grad}
    assert rec.stats["held_out_batches"] == 2 == len(checked)
    assert checked == {0, 9} and not trained & checked and len(trained) == 8
    assert sum(not grad for _, grad in seen) == 2 * (1 + 25 // 5)  # before training, then every 5 steps


def test_the_best_held_out_point_is_the_one_kept(monkeypatch):
    model, inputs = hf_model("bert", layers=2)
    checks: list[float] = []
    kept: list[float] = []
    check, restore = HealRun.check, HealRun.restore_best

    def spy_check(self):
        checks.append(check(self))
        return checks[-1]

    def spy_restore(self):
        best = restore(self)
        with torch.no_grad():
            kept.append(sum(float(self.loss(i)) for i in self.held) / len(self.held))
        return best

    monkeypatch.setattr(HealRun, "check", spy_check)
    monkeypatch.setattr(HealRun, "restore_best", spy_restore)
    # a constant, too-high learning rate: the held-out loss does not fall monotonically
    res = go.optimize(model, inputs, "dyt,heal(steps=40,lr=3e-2,schedule=constant,eval_every=4,patience=0,warmup=0)",
                      calib=_calib(model), measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert len(checks) == 11
    assert kept[0] == pytest.approx(min(checks), rel=1e-5)
    assert rec.stats["loss_after"] == pytest.approx(min(checks), rel=1e-5)
    assert rec.stats["best_step"] == 4 * checks.index(min(checks))


def test_the_recipe_follows_the_change_and_given_options_win():
    model, inputs = hf_model("bert", layers=2)
    calib = _calib(model)
    rec = _record(go.optimize(model, inputs, "dyt,heal(steps=6)", calib=calib, measure=False, on_error="raise"))
    assert rec.diagnostics[0].message.startswith("recipe for dyt: lr=")
    assert "steps=" not in rec.diagnostics[0].message and rec.stats["steps"] == 6

    res = go.optimize(model, inputs, "prune(ratio=0.5),heal(steps=4,blockwise=3)", calib=calib, measure=False,
                      on_error="raise")
    rec = _record(res)
    assert rec.diagnostics[0].message.startswith("recipe for prune")
    assert "block_loss_after" in rec.stats and rec.stats["steps"] == 4

    res = go.optimize(model, inputs, "dyt,heal(recipe=depth,steps=4)", calib=calib, measure=False, on_error="raise")
    assert RECIPES["depth"].freeze == "*embeddings*"
    embeddings = sum(p.numel() for n, p in res.model.named_parameters() if "embeddings" in n)
    assert _record(res).stats["trained_params"] == sum(p.numel() for p in res.model.parameters()) - embeddings


def test_a_language_model_gets_the_language_model_recipes():
    """KL on next-token distributions at a 10x smaller lr (measured on SmolLM2); an encoder keeps its own."""
    assert LM_RECIPES["depth"].loss == "kl" and LM_RECIPES["depth"].lr < RECIPES["depth"].lr
    for name, recipes, family_note in (("llama_causal_lm", LM_RECIPES, True), ("bert", RECIPES, False)):
        model, inputs = hf_model(name)
        rec = _record(go.optimize(model, inputs, "drop_blocks(n=1),heal(steps=2)", calib=_calib(model),
                                  measure=False, on_error="raise"))
        recipe = recipes["depth"]
        assert rec.diagnostics[0].message.startswith(f"recipe for depth: lr={recipe.lr!r}, loss={recipe.loss!r}")
        assert any("recipes for language models" in d.message for d in rec.diagnostics) == family_note


def test_only_a_distribution_at_every_position_makes_a_language_model():
    assert is_language_model({"logits": torch.zeros(2, 5, 11)})
    assert is_language_model({"out.logits": torch.zeros(2, 5, 11), "hidden": torch.zeros(2, 5, 3)})
    assert not is_language_model({"logits": torch.zeros(2, 11)})  # a classifier
    assert not is_language_model({"last_hidden_state": torch.zeros(2, 5, 11)})


def test_steps_and_blockwise_are_one_schedule_an_explicit_one_wins_over_the_recipes():
    """heal(steps=N) after prune runs N steps, not the recipe's block-wise stage too (it once ran 384 s)."""
    model, inputs = hf_model("bert", layers=2)
    calib = _calib(model)
    rec = _record(go.optimize(model, inputs, "prune(ratio=0.5),heal(steps=3)", calib=calib, measure=False,
                              on_error="raise"))
    assert rec.stats["steps"] == 3 and "block_loss_after" not in rec.stats
    assert "blockwise=0" in rec.diagnostics[0].message

    rec = _record(go.optimize(model, inputs, "prune(ratio=0.5),heal(blockwise=2)", calib=calib, measure=False,
                              on_error="raise"))
    assert "block_loss_after" in rec.stats and rec.stats["steps"] == 0

    rec = _record(go.optimize(model, inputs, "prune(ratio=0.5),heal", calib=calib, measure=False,
                              on_error="raise"))
    assert rec.stats["steps"] > 0 and "block_loss_after" in rec.stats  # left unset: the recipe's whole


def test_heal_on_a_model_no_pass_changed_does_nothing_and_says_why():
    model, inputs = hf_model("bert", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = go.optimize(model, inputs, "heal", calib=_calib(model), measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert rec.status == "unchanged" and "steps" not in rec.stats
    assert "the model is still the original (no earlier pass changed it): nothing to heal" in [
        d.message for d in rec.diagnostics]
    assert all(torch.equal(v, res.model.state_dict()[k]) for k, v in before.items())


def test_new_lr_scale_speeds_up_only_the_parameters_earlier_passes_made():
    model, inputs = hf_model("bert", layers=2)
    calib = _calib(model)
    start = dict(go.optimize(model, inputs, "dyt", calib=calib, measure=False, on_error="raise")
                 .model.named_parameters())
    moved = {}
    for scale in (1, 10):
        res = go.optimize(model, inputs, f"dyt,heal(steps=1,lr=1e-4,warmup=0,eval_every=1,new_lr_scale={scale})",
                          calib=calib, measure=False, on_error="raise")
        assert _record(res).stats["best_step"] == 1  # the step was kept
        moved[scale] = {n: float((p - start[n]).detach().abs().max()) for n, p in res.model.named_parameters()}
    new = [n for n in moved[1] if ".alpha" in n]
    assert new and all(moved[10][n] == pytest.approx(10 * moved[1][n], rel=0.05) for n in new)
    old = [n for n in moved[1] if "attention.self.query.weight" in n]
    assert old and all(moved[10][n] == pytest.approx(moved[1][n], rel=1e-3) for n in old)
    assert RECIPES["dyt"].new_lr_scale > 1 == RECIPES["prune"].new_lr_scale


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_the_quantize_recipe_fits_block_by_block_then_end_to_end(name):
    model, inputs = hf_model(name, layers=2)
    calib = _calib(model)
    res = go.optimize(model, inputs, "quantize(scheme=int4,group_size=32),heal", calib=calib,
                      measure=False, on_error="raise")
    rec = _record(res)
    assert rec.diagnostics[0].message.startswith("recipe for quantize") and RECIPES["quantize"].blockwise > 0
    assert rec.stats["block_loss_after"] < rec.stats["block_loss_before"]
    assert rec.stats["loss_after"] < rec.stats["loss_before"] and 0 < rec.stats["steps"] <= RECIPES["quantize"].steps


def test_a_recipes_block_wise_stage_falls_back_to_end_to_end_without_blocks():
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    calib = [torch.randn(16, 8) for _ in range(10)]
    res = go.optimize(mlp, calib[0], "prune(ratio=0.5),heal(lr=1e-3,patience=0)", calib=calib, measure=False,
                      on_error="raise")
    rec = _record(res)
    assert RECIPES["prune"].blockwise > 0 and "blockwise=0" in rec.diagnostics[0].message
    assert rec.diagnostics[1].message.startswith("no block-wise stage")
    assert rec.stats["steps"] == max(RECIPES["prune"].steps, 200)
    assert rec.stats["loss_after"] < rec.stats["loss_before"]


def test_change_kind_reads_the_edit_log():
    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    for pipeline, kind in [("remove_dropout", "other"), ("dyt", "dyt"), ("prune(ratio=0.3)", "prune"),
                           ("dyt,drop_blocks(n=1)", "depth"), ("quantize(scheme=int8)", "quantize"),
                           ("dyt,prune(ratio=0.3)", "prune")]:
        res = go.optimize(model, inputs, pipeline, calib=calib, measure=False, on_error="raise")
        assert change_kind(res.program) == kind, pipeline


def test_a_users_lossy_pass_gets_the_recipe_of_the_change_it_declares():
    """No table of pass names in heal: each edit records the kind its pass declares (Pass.change)."""

    @go.register_pass("t_shrink_ffn", tolerance=None, change="prune", replace=True)
    def shrink(program, am):
        for name, module in program.named_modules():
            if name.endswith("intermediate.dense"):
                program.set_tensor(f"{name}.weight", module.weight.detach() * 0.5)
        return go.PassResult(modified=True)

    model, inputs = hf_model("bert", layers=2)
    res = go.optimize(model, inputs, "t_shrink_ffn", measure=False, on_error="raise")
    assert {e.kind for e in res.program.edits} == {"prune"} and change_kind(res.program) == "prune"
    exact = go.optimize(model, inputs, "remove_dropout", measure=False, on_error="raise")
    assert {e.kind for e in exact.program.edits} == {""} and change_kind(exact.program) == "other"


def test_progressive_dyt_heals_after_each_block():
    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    swap = go.optimize(model, inputs, "dyt", calib=calib, measure=False, on_error="raise")
    runs = [go.optimize(model, inputs, "dyt(progressive=40)", calib=calib, measure=False, on_error="raise")
            for _ in range(2)]
    rec = _record(runs[0], "dyt")
    units = [d for d in rec.diagnostics if d.message.startswith("healed 40 steps")]
    assert [d.target for d in units] == ["embeddings.LayerNorm", "encoder.layer.0", "encoder.layer.1",
                                         "encoder.layer.2"]
    assert rec.stats["converted"] == 7 and rec.stats["progressive_heal_steps"] == 160
    fresh = _calib(model, seed=99)  # text heal never saw
    assert _error(model, runs[0].model, fresh) < 0.8 * _error(model, swap.model, fresh)  # healed, unlike a swap
    for (n, a), (_, b) in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().items()):
        assert torch.equal(a, b), n  # seeded
    assert all(p.requires_grad for p in runs[0].model.parameters())


def test_progressive_needs_a_teacher_even_in_place():
    model, inputs = hf_model("bert", layers=2)
    res = go.optimize(model, inputs, "dyt(progressive=3)", calib=_calib(model), inplace=True, measure=False,
                      on_error="raise")
    assert res.model is model and _record(res, "dyt").stats["progressive_units"] == 3


@pytest.mark.parametrize("target", ["target_params=0.8", "target_params=0.6"])
def test_progressive_prune_reaches_the_target_in_rounds(target):
    model, inputs = hf_model("bert", layers=2)
    calib = _calib(model)
    one_shot = go.optimize(model, inputs, f"prune({target})", calib=calib, measure=False, on_error="raise")
    res = go.optimize(model, inputs, f"prune({target},progressive=20,rounds=3)", calib=calib, measure=False,
                      on_error="raise")
    rec = _record(res, "prune")
    healed = [d.target for d in rec.diagnostics if d.message.startswith("healed")]
    assert healed[:2] == ["round 1/3", "round 2/3"] and any("[round 3/3]" in d.message for d in rec.diagnostics)
    n = sum(p.numel() for p in res.model.parameters())
    assert n == pytest.approx(sum(p.numel() for p in one_shot.model.parameters()), rel=0.03)
    assert n < 0.9 * sum(p.numel() for p in model.parameters())
    fresh = _calib(model, seed=99)  # text heal never saw
    assert _error(model, res.model, fresh) < _error(model, one_shot.model, fresh)  # healed between rounds
    with pytest.raises(go.PassFailedError, match="target_flops"):
        go.optimize(model, inputs, "prune(target_flops=0.8,progressive=5)", calib=calib, measure=False,
                    on_error="raise")


def test_progressive_quantize_goes_block_by_block():
    from graphopt.nn.quant import QuantLinear

    model, inputs = hf_model("bert", layers=2)
    calib = _calib(model)
    one_shot = go.optimize(model, inputs, "quantize(scheme=int4,group_size=16)", calib=calib, measure=False,
                           on_error="raise")
    res = go.optimize(model, inputs, "quantize(scheme=int4,group_size=16,progressive=30)", calib=calib,
                      measure=False, on_error="raise")
    rec = _record(res, "quantize")
    assert [d.target for d in rec.diagnostics if d.message.startswith("healed")] == ["encoder.layer.0",
                                                                                     "encoder.layer.1", "the rest"]
    kinds = lambda m: sorted(n for n, x in m.named_modules() if isinstance(x, QuantLinear))  # noqa: E731
    assert kinds(res.model) == kinds(one_shot.model) and len(kinds(res.model)) == 2 * 6 + 1
    assert rec.stats["bits_per_weight"] == _record(one_shot, "quantize").stats["bits_per_weight"]
    fresh = _calib(model, seed=99)  # text heal never saw
    assert _error(model, res.model, fresh) < _error(model, one_shot.model, fresh)
    with pytest.raises(go.PassFailedError, match="where="):
        go.optimize(model, inputs, "quantize(where='encoder.*',progressive=5)", calib=calib, measure=False,
                    on_error="raise")
