"""quantize on convolutions: Before (Conv2d) -> Expected (QuantConv2d holding the rounded weight as packed rows),
on HF vision models and hand-built CNNs; what stays in float is named with why."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.nn.quant import QuantConv2d, QuantLinear, dequantize, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32), nn.ReLU(),  # depthwise
                          nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return model.eval(), torch.randn(4, 3, 16, 16)


def _calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_every_conv2d_becomes_packed_rows_of_its_rounded_weight(name):
    model, inputs = hf_model(name)
    convs = _convs(model)
    res = go.optimize(model, inputs, "quantize(scheme=int8)", measure=False, on_error="raise")
    rec = res.report.records[-1]
    packed = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantConv2d)}
    linears = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(packed) == set(convs) and rec.stats["layers"] == len(packed) + len(linears)
    for n, q in packed.items():  # each holds exactly the per-channel rounding of its own weight
        w = convs[n].weight.detach()
        codes, scale = quantize_weight(w.reshape(w.shape[0], -1), "int8", 0)
        assert torch.equal(q.dequantized_weight(), dequantize(codes, scale, 0).reshape(w.shape))
        assert (q.stride, q.padding, q.groups) == (convs[n].stride, convs[n].padding, convs[n].groups)
    with torch.no_grad():
        ref, got = model(**inputs).last_hidden_state, res.model(**inputs).last_hidden_state
    assert go.compare_outputs(got, ref).max_rel < 0.02
    assert rec.stats["bits_per_weight"] < 9  # int8 codes and a float32 scale per channel
    assert all(type(m) is nn.Conv2d for m in _convs(model).values())  # the caller's model keeps its convolutions


@pytest.mark.parametrize("scheme, rel", [("int8", 0.02), ("int4", 0.25), ("ternary", 0.9)])
def test_schemes_on_a_cnn_with_depthwise_and_strided_convolutions(scheme, rel):
    model, x = _cnn()
    res = go.optimize(model, x, f"quantize(scheme={scheme})", measure=False, on_error="raise")
    q = res.model
    assert [type(q[i]) for i in (0, 2, 4, 8)] == [QuantConv2d, QuantConv2d, QuantConv2d, QuantLinear]
    # int4 by default: the largest of 128/64/32 dividing the row (3 x 3 x 3 and 5 x 5: none, one scale per row)
    assert [q[i].group_size for i in (0, 2, 4)] == ([0, 0, 32] if scheme == "int4" else [0, 0, 0])
    with torch.no_grad():
        err = go.compare_outputs(q(x), model(x)).max_rel
    assert 0 < err < rel


def test_a_saved_quantized_cnn_reloads_to_the_same_outputs(tmp_path):
    model, x = _cnn()
    res = go.optimize(model, x, "quantize(scheme=int4,group_size=8,uneven_groups=short)", measure=False, on_error="raise")
    go.save(res, tmp_path / "q")
    loaded = go.load(tmp_path / "q", _cnn()[0])
    assert isinstance(loaded[2], QuantConv2d) and loaded[2].group_size == 8 and loaded[2].groups == 32
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))


def test_convolutions_under_w8a8_stay_in_float_and_say_how_to_pack_them():
    model, x = _cnn()
    res = go.optimize(model, x, "quantize(scheme=w8a8,alpha=0)", measure=False, on_error="raise")
    why = {d.target: d.message for d in res.report.records[-1].diagnostics if d.level == "skipped"}
    assert type(res.model[0]) is nn.Conv2d and isinstance(res.model[8], QuantLinear)
    assert "w8a8's integer kernels are Linear ones" in why["0"] and "layers={'0': int8}" in why["0"]
    res = go.optimize(model, x, "quantize(scheme=w8a8,alpha=0,layers={'0': int8,'2': int8,'4': int8})",
                      measure=False, on_error="raise")
    assert [type(res.model[i]) for i in (0, 2, 4)] == [QuantConv2d] * 3
    assert res.model[8].activations == "per_tensor"


class _Scaled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_convolutions_it_cannot_rebuild_are_left_alone_with_why():
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(8, 8, 1), nn.Identity(), nn.ConvTranspose2d(8, 4, 2), nn.Conv2d(4, 4, 1)).eval()
    model[5].register_forward_hook(lambda m, a, out: out + 1)
    x = torch.randn(2, 3, 10, 10)
    res = go.optimize(model, x, "quantize", measure=False, on_error="raise")
    rec = res.report.records[-1]
    why = {d.target: d.message for d in rec.diagnostics if d.level == "skipped"}
    assert "overrides Conv2d.forward" in why["0"] and "'reflect'" in why["1"] and "forward hook" in why["5"]
    assert isinstance(res.model[2], QuantConv2d) and rec.stats["layers"] == 1
    note = next(d for d in rec.diagnostics if "stay in float" in d.message)
    assert note.level == "warning" and note.target == "4" and note.message.startswith("1 convolution layer(s)")
    with torch.no_grad():
        assert go.compare_outputs(res.model(x), model(x)).max_rel < 0.02  # the subclass and hook still act


def test_gptq_rounds_convolutions_to_nearest_and_says_so():
    model, x = _cnn()
    res = go.optimize(model, x, "quantize(scheme=int4,method=gptq,group_size=0)", calib=_calib(), measure=False,
                      on_error="raise")
    rec = res.report.records[-1]
    note = next(d for d in rec.diagnostics if "rounded to nearest" in d.message)
    assert note.level == "warning" and note.message.startswith("3 convolution(s)") and note.target == "0 (+2)"
    w = model[4].weight.detach()
    codes, scale = quantize_weight(w.reshape(16, -1), "int4", 0)
    assert torch.equal(res.model[4].dequantized_weight(), dequantize(codes, scale, 0).reshape(w.shape))
    rtn = QuantLinear.from_linear(model[8].weight, model[8].bias, scheme="int4", group_size=0)
    assert not torch.equal(res.model[8].codes(), rtn.codes())  # the Linear layer was solved by GPTQ


def test_budget_bits_ranks_convolutions_with_the_linear_layers():
    model, x = _cnn()
    res = go.optimize(model, x, "quantize(scheme=int4,budget_bits=6,group_size=0)", calib=_calib(), measure=False,
                      on_error="raise")
    rec = res.report.records[-1]
    schemes = [res.model[i].scheme for i in (0, 2, 4, 8)]
    assert "int8" in schemes and "int4" in schemes and rec.stats["planned_bits"] <= 6
    ranked = [d.target for d in rec.diagnostics if "sensitivity" in d.message]
    assert sorted(ranked) == ["0", "2", "4", "8"]


def test_a_quantized_convolution_is_refused_by_the_compressed_tensors_writer(tmp_path):
    model, inputs = hf_model("resnet")
    res = go.optimize(model, inputs, "quantize", measure=False, on_error="raise")
    with pytest.raises(ValueError, match="quantized convolutions have no compressed-tensors form"):
        res.model.save_pretrained(tmp_path / "ct")
    assert not (tmp_path / "ct" / "config.json").exists()


def _bn_cnn():
    """Depthwise convolutions without bias between ReLU6 and BatchNorm: inputs with a large mean, and channels
    whose spread BatchNorm divides by (what EfficientNet and MobileNet look like)."""
    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU6()]
    for _ in range(3):
        layers += [nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(0, 2)
            m.running_var.uniform_(0.001, 0.05)  # small spreads amplify a shifted mean
    return model.eval()


def test_bias_correction_zeroes_each_layers_mean_output_shift_on_the_calibration_data(tmp_path):
    model = _bn_cnn()
    g = torch.Generator().manual_seed(2)
    calib = [torch.rand(4, 3, 12, 12, generator=g) * 4 for _ in range(3)]
    held = torch.rand(8, 3, 12, 12, generator=g) * 4
    plain = go.optimize(model, calib[0], "quantize(scheme=int4,group_size=0)", measure=False, on_error="raise")
    res = go.optimize(model, calib[0], "quantize(scheme=int4,group_size=0,bias_correction=true)", calib=calib,
                      measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert rec.stats["bias_corrected"] == 5 and any("bias correction: 5 layers" in d.message for d in rec.diagnostics)
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for b in calib:
            model(b)
        for h in handles:
            h.remove()
        for name, xs in inputs.items():
            x, float_conv, packed = torch.cat(xs), model.get_submodule(name), res.model.get_submodule(name)
            assert isinstance(packed, QuantConv2d) and packed.bias is not None  # a bias added where there was none
            shift = (packed(x) - float_conv(x)).mean((0, 2, 3))
            before = (plain.model.get_submodule(name)(x) - float_conv(x)).mean((0, 2, 3))
            assert shift.abs().max() < 1e-4 * before.abs().max() + 1e-6, name
        ref = model(held)  # held-out inputs: the mean of the logits moves far less
        assert (res.model(held) - ref).mean(0).abs().max() < 0.5 * (plain.model(held) - ref).mean(0).abs().max()
    go.save(res, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(go.load(tmp_path / "q", _bn_cnn())(held), res.model(held))


def test_bias_correction_is_for_round_to_nearest():
    model, x = _cnn()
    with pytest.raises(go.PassFailedError, match="compensates its rounding error itself"):
        go.optimize(model, x, "quantize(method=gptq,bias_correction=true)", calib=[x], measure=False,
                    on_error="raise")
