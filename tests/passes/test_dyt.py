"""dyt: conversion of every HF norm family, calibration, options, save/load (norm recognition: tests/analysis)."""


import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import flatten_outputs
from graphopt.helpers.zoo import ZOO, hf_model
from graphopt.nn.dyt import ELN, DyT

from ..analysis.test_norms import FakeNorm

pytestmark = pytest.mark.usefixtures("one_thread")


# --- every HF norm family ------------------------------------------------------------------------------

def _t5():
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ids = torch.randint(0, 128, (2, 8))
    return T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    return ConvNextModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _model(name):
    if name in ZOO:
        return hf_model(name)
    return {"t5": _t5, "convnext": _convnext}[name]()


def _is_norm(m):  # an independent oracle: the classes these models are known to use
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "T5LayerNorm"))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "vit", "convnext"])
def test_every_norm_converts_and_model_runs(name):
    model, inputs = _model(name)
    expected = sum(_is_norm(m) for m in model.modules())
    res = go.optimize(model, inputs, "dyt(mode=init)", measure=False, on_error="raise")
    dyts = [m for m in res.model.modules() if isinstance(m, DyT)]
    assert expected > 0 and len(dyts) == expected == res.report.records[-1].stats["converted"]
    assert not any(_is_norm(m) for m in res.model.modules())
    out = res.program.run()
    assert all(torch.isfinite(t).all() for t in flatten_outputs(out).values())
    rms = name in ("llama", "t5")
    assert all((d.bias is None) == rms for d in dyts)
    if name == "convnext":
        assert {d.channel_dim for d in dyts} == {-1, 1}
    assert sum(_is_norm(m) for m in model.modules()) == expected  # the caller's model is untouched


def test_init_alpha_defaults_by_role():
    model, inputs = hf_model("llama")
    res = go.optimize(model, inputs, "dyt(mode=init)", measure=False, on_error="raise")
    alpha = {n: float(m.alpha.detach()) for n, m in res.model.named_modules() if isinstance(m, DyT)}
    assert alpha["layers.0.input_layernorm"] == pytest.approx(0.8)
    assert alpha["layers.1.post_attention_layernorm"] == pytest.approx(0.2)
    assert alpha["norm"] == pytest.approx(0.2)
    bert, binputs = hf_model("bert")
    res = go.optimize(bert, binputs, "dyt(mode=init,affine=fresh)", measure=False, on_error="raise")
    dyts = [m for m in res.model.modules() if isinstance(m, DyT)]
    assert all(float(d.alpha.detach()) == 0.5 and torch.equal(d.weight, torch.ones_like(d.weight)) for d in dyts)
    res = go.optimize(bert, binputs, "dyt(mode=init,alpha0=0.3)", measure=False, on_error="raise")
    ln = bert.get_submodule("encoder.layer.0.output.LayerNorm")
    new = res.model.get_submodule("encoder.layer.0.output.LayerNorm")
    assert float(new.alpha.detach()) == pytest.approx(0.3) and torch.equal(new.weight, ln.weight)
    assert torch.equal(new.bias, ln.bias)


# --- calibration ----------------------------------------------------------------------------------------

def _calib(vocab=128, n=6, batch=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # some padding: must be ignored by the fits
        out.append({"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "attention_mask": mask})
    return out


def _error(model, ref_model, batches):
    with torch.no_grad():
        errs = [(model(**b).last_hidden_state - ref_model(**b).last_hidden_state).pow(2).mean() for b in batches]
    return float(torch.stack(errs).mean())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_calibrated_beats_init_on_the_same_data(name):
    model, inputs = hf_model(name)
    calib, held = _calib(seed=1), _calib(seed=2, n=2)
    init = go.optimize(model, inputs, "dyt(mode=init)", calib=calib, measure=False, on_error="raise").model
    cal = go.optimize(model, inputs, "dyt", calib=calib, measure=False, on_error="raise")
    e_init, e_cal = _error(init, model, held), _error(cal.model, model, held)
    assert e_cal < 0.5 * e_init, (e_cal, e_init)
    stats = cal.report.records[-1].stats
    assert 0 <= stats["mean_fit_rel_mse"] < 0.5
    notes = [d for d in cal.report.records[-1].diagnostics if "alpha=" in d.message]
    assert len(notes) == stats["converted"]


def test_alpha_is_per_channel_when_fitted_unless_asked_otherwise():
    model, inputs = hf_model("bert")
    calib, held = _calib(seed=1), _calib(seed=2, n=2)
    shapes, errs = {}, {}
    for pipe in ("dyt", "dyt(per_channel_alpha=false)", "dyt(mode=init)", "dyt(mode=init,per_channel_alpha=true)"):
        res = go.optimize(model, inputs, pipe, calib=calib, measure=False, on_error="raise").model
        layers = [m for m in res.modules() if isinstance(m, DyT)]
        shapes[pipe] = {tuple(m.alpha.shape) for m in layers}
        errs[pipe] = _error(res, model, held)
    width = model.config.hidden_size
    assert shapes == {"dyt": {(width,)}, "dyt(per_channel_alpha=false)": {(1,)}, "dyt(mode=init)": {(1,)},
                      "dyt(mode=init,per_channel_alpha=true)": {(width,)}}
    # one alpha per channel fits the norms at least as well as one per layer
    assert errs["dyt"] <= errs["dyt(per_channel_alpha=false)"] * 1.05, errs


def test_calibrated_fit_to_original_and_local_both_improve_on_init():
    model, inputs = hf_model("gpt2")
    calib = _calib()
    errs = {}
    for pipe in ("dyt(mode=init)", "dyt(fit_to=local)", "dyt(fit_to=original)", "dyt(variant=eln)"):
        res = go.optimize(model, inputs, pipe, calib=calib, measure=False, on_error="raise")
        errs[pipe] = _error(res.model, model, calib[:2])
    assert max(errs["dyt(fit_to=local)"], errs["dyt(fit_to=original)"], errs["dyt(variant=eln)"]) \
        < errs["dyt(mode=init)"], errs


def test_calibrated_without_calib_fails_clearly():
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "dyt", measure=False)
    record = res.report.records[-1]
    assert record.status == "rolled back" and "needs calibration data" in record.reason
    assert go.optimize(model, inputs, "dyt(mode=init)", measure=False).report.records[-1].status == "ok"


# --- options, modules, serialisation ------------------------------------------------------------------------

def test_target_where_and_variant_options():
    model, inputs = hf_model("llama")
    res = go.optimize(model, inputs, "dyt(mode=init,target=layernorm)", measure=False)
    rec = res.report.records[-1]
    assert rec.status == "unchanged" and not any(isinstance(m, DyT) for m in res.model.modules())
    assert sum("is a rmsnorm; target=layernorm" in d.message for d in rec.diagnostics) == 5
    res = go.optimize(model, inputs, "dyt(mode=init,where='layers.1.*',variant=eln)", measure=False)
    converted = {n for n, m in res.model.named_modules() if isinstance(m, ELN)}
    assert converted == {"layers.1.input_layernorm", "layers.1.post_attention_layernorm"}
    assert str(go.parse_pipeline("dyt(mode=init,variant=eln,where='a.*')")) == "dyt(mode=init,variant=eln,where=a.*)"


def test_skipped_norm_like_modules_are_reported():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 6), FakeNorm(6), nn.BatchNorm1d(6))
    res = go.optimize(model, torch.randn(3, 6), "dyt(mode=init)", measure=False, on_error="raise")
    skipped = {d.target: d.message for d in res.report.records[-1].diagnostics if d.level == "skipped"}
    assert set(skipped) == {"3", "4"} and isinstance(res.model[1], DyT)


def test_save_and_load_replays_the_swap(tmp_path):
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "dyt", calib=_calib(n=2), measure=False, on_error="raise")
    go.save(res, tmp_path / "m")
    fresh, _ = hf_model("bert", seed=5)
    loaded = go.load(tmp_path / "m", fresh)
    assert sum(isinstance(m, DyT) for m in loaded.modules()) == 5
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).last_hidden_state, res.model(**inputs).last_hidden_state)
