"""dyt: structural norm detection, conversion of every HF norm family, calibration, options, save/load."""

import math

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.module_spec import build_module, module_spec
from graphopt.norms import ELN, DyT, NormInfo, fit_elementwise, isru, probe_norm
from graphopt.zoo import ZOO, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- odd norm-like modules ---------------------------------------------------------------------------

class ScaleOnlyNorm(nn.Module):
    """An RMSNorm under another name, with ``epsilon`` and a ``gamma`` parameter."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c))
        self.epsilon = 1e-5

    def forward(self, x):
        return self.gamma * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon)


class OffsetRMS(nn.Module):
    """Gemma-style: scale by ``1 + weight``."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class ChannelsFirstLN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), 1e-6

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class FakeNorm(nn.Module):
    """Looks like a norm (eps, weight) but only scales: must not be converted."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(c)), 1e-5

    def forward(self, x):
        return x * self.weight


def test_probe_recognises_norms_by_behaviour_not_name():
    info = probe_norm(ScaleOnlyNorm(6))
    assert isinstance(info, NormInfo) and info.kind == "rmsnorm" and info.bias is None and info.eps == 1e-5
    off = OffsetRMS(6)
    with torch.no_grad():
        off.weight.fill_(0.25)
    info = probe_norm(off)
    assert info.kind == "rmsnorm" and info.weight_offset == 1.0 and torch.allclose(info.weight, torch.full((6,), 1.25))
    info = probe_norm(ChannelsFirstLN(5))
    assert info.kind == "layernorm" and info.channel_dim == 1
    info = probe_norm(nn.LayerNorm(7, elementwise_affine=False))
    assert info.kind == "layernorm" and info.weight is None and info.channels == 7
    assert probe_norm(nn.RMSNorm(4)).kind == "rmsnorm"


@pytest.mark.parametrize("module, why", [
    (FakeNorm(6), "matches neither"),
    (nn.BatchNorm1d(6), "batch statistics"),
    (nn.GroupNorm(2, 6), "matches neither"),
    (nn.LayerNorm((3, 4)), "(3, 4)"),
])
def test_probe_rejects_with_reason(module, why):
    assert why in probe_norm(module)


def test_probe_works_on_meta_weights():
    with torch.device("meta"):
        ln = nn.LayerNorm(8)
    info = probe_norm(ln)
    assert info.kind == "layernorm" and info.weight.device.type == "meta"


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
    assert all(torch.isfinite(t).all() for t in go.inputs.flatten_outputs(out).values())
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


def test_fit_elementwise_recovers_known_parameters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g) * 3.0
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    for squash in (torch.tanh, isru):
        y = gamma * squash(0.37 * x) + beta
        fit = fit_elementwise(x, y, squash)
        assert fit.alpha.shape == (1,) and float(fit.alpha) == pytest.approx(0.37, rel=1e-3)
        assert torch.allclose(fit.weight, gamma, atol=1e-3) and torch.allclose(fit.bias, beta, atol=1e-3)
        assert fit.rel_mse < 1e-6
    alphas = torch.linspace(0.1, 2.0, 8)
    fit = fit_elementwise(x, gamma * torch.tanh(alphas * x), torch.tanh, bias=False, per_channel_alpha=True)
    assert fit.bias is None and torch.allclose(fit.alpha, alphas, rtol=1e-2)


def test_fit_beats_linear_on_layernorm_outputs():
    x = torch.randn(2000, 16) * torch.rand(2000, 1) * 4  # tokens of very different scale
    y = nn.functional.layer_norm(x, (16,))
    fit = fit_elementwise(x, y, torch.tanh)
    assert 0 < fit.rel_mse < 1.0 and math.isfinite(float(fit.alpha))


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


def test_modules_forward_and_spec_round_trip():
    x = torch.randn(2, 5, 6)
    d = DyT(6, alpha0=0.7)
    with torch.no_grad():
        d.weight.normal_()
        d.bias.normal_()
    assert torch.allclose(d(x), d.weight * torch.tanh(0.7 * x) + d.bias)
    e = ELN(6, alpha0=0.7, bias=False)
    assert torch.allclose(e(x), 0.7 * x / torch.sqrt(1 + (0.7 * x) ** 2))
    cf = DyT(6, channel_dim=1, per_channel_alpha=True)
    xc = torch.randn(2, 6, 3, 3)
    assert torch.allclose(cf(xc), torch.tanh(0.5 * xc))
    with torch.no_grad():  # the in-place inference paths compute the same function
        assert torch.allclose(d(x), d.weight * torch.tanh(0.7 * x) + d.bias, atol=1e-6)
        assert torch.allclose(e(x), 0.7 * x / torch.sqrt(1 + (0.7 * x) ** 2), atol=1e-6)
        assert torch.allclose(cf(xc), torch.tanh(0.5 * xc), atol=1e-6)
        assert d(x.half()).dtype == torch.float16
    for m in (d, e, cf, DyT(6, fused=True)):
        rebuilt = build_module(module_spec(m))
        assert type(rebuilt) is type(m) and rebuilt.graphopt_spec() == m.graphopt_spec()
    fused = DyT(6, fused=True)
    fused.load_state_dict(d.state_dict())
    assert torch.allclose(fused(x), d(x), atol=1e-6)


def test_save_and_load_replays_the_swap(tmp_path):
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "dyt", calib=_calib(n=2), measure=False, on_error="raise")
    go.save(res, tmp_path / "m")
    fresh, _ = hf_model("bert", seed=5)
    loaded = go.load(tmp_path / "m", fresh)
    assert sum(isinstance(m, DyT) for m in loaded.modules()) == 5
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).last_hidden_state, res.model(**inputs).last_hidden_state)
