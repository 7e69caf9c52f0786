"""factorize on convolutions: 1x1 ungrouped ones become LowRankConv2d pairs (stride and padding kept), every
other convolution is left alone with the reason; the pairs save, load, export and quantize."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt as go
from graphopt.emit.hf import NotLoadableError
from graphopt.helpers.zoo import hf_model
from graphopt.nn.lowrank import LowRankConv2d
from graphopt.nn.quant import QuantConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(inputs, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(inputs["pixel_values"].shape, generator=g)} for _ in range(n)]


def _convs(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}


def _notes(res):
    rec = next(r for r in res.report.records if r.name.startswith("factorize"))
    return {d.target: d for d in rec.diagnostics}, rec


@pytest.mark.parametrize("stride,padding,mode", [(1, 0, "zeros"), (2, 0, "zeros"), (2, 1, "zeros"),
                                                 (1, 2, "reflect"), (1, "same", "zeros")])
def test_a_pair_computes_the_one_by_one_convolution_of_its_product(stride, padding, mode):
    torch.manual_seed(0)
    dense = nn.Conv2d(12, 20, 1, stride=stride, padding=padding, padding_mode=mode)
    up, down = torch.randn(20, 5), torch.randn(5, 12)
    pair = LowRankConv2d.from_factors(up, down, dense.bias.detach(), like=dense)
    x = torch.randn(2, 12, 9, 7)
    with torch.no_grad():
        dense.weight.copy_((up @ down)[:, :, None, None])
        assert torch.allclose(pair(x), dense(x), atol=1e-5)  # padded borders hold the bias, as before
    assert pair.dense_weight().shape == (20, 12) and torch.allclose(pair.dense_weight(), up @ down)


def test_resnet_pointwise_convolutions_become_pairs_and_the_others_say_why_not():
    model, inputs = hf_model("resnet")
    calib = _pixels(inputs)
    before = _convs(model)
    pointwise = {n for n, m in before.items() if m.kernel_size == (1, 1) and m.groups == 1}
    strided = {n for n in pointwise if before[n].stride == (2, 2)}
    assert pointwise and strided  # the bottlenecks' 1x1 convolutions and the strided shortcut
    res = go.optimize(model, inputs, "factorize(ratio=0.3,rank_multiple=2)", calib=calib, on_error="raise")
    after = dict(res.model.named_modules())
    assert {n for n, m in after.items() if isinstance(m, LowRankConv2d)} == pointwise
    assert all(after[n].down.stride == (2, 2) for n in strided)
    notes, rec = _notes(res)
    for name in set(before) - pointwise:
        assert "factorize takes 1x1 ungrouped convolutions" in notes[name].message
        assert type(after[name]) is nn.Conv2d
    assert rec.stats["removed"] >= 0.3 and rec.status == "ok"


def test_whitened_pairs_track_the_convolutions_better_than_plain_svd():
    model, inputs = hf_model("resnet")
    calib, held = _pixels(inputs), _pixels(inputs, n=3, seed=9)

    def error(method):
        cut = go.optimize(model, inputs, f"factorize(ratio=0.3,rank_multiple=2,method={method})", calib=calib,
                          measure=False, on_error="raise").model
        assert any(isinstance(m, LowRankConv2d) for m in cut.modules())
        with torch.no_grad():
            return sum(float((cut(**b).last_hidden_state - model(**b).last_hidden_state).pow(2).mean())
                       for b in held)

    assert error("whiten") < 0.1 * error("svd")  # measured: 0.28 against 17.3


def test_model_code_that_reads_the_convolutions_geometry_still_runs():
    model, inputs = hf_model("mobilenet_v2")  # TF "SAME" padding reads each convolution's stride and kernel
    res = go.optimize(model, inputs, "factorize(rank=2,method=svd)", on_error="raise")
    pairs = [m for m in res.model.modules() if isinstance(m, LowRankConv2d)]
    assert len(pairs) == 34 and all(p.kernel_size == (1, 1) and p.dilation == (1, 1) for p in pairs)
    assert res.report.records[-1].status == "ok"  # ran on its example inputs


def test_a_depthwise_only_model_changes_nothing_and_says_so():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)).eval()
    x = torch.randn(2, 8, 10, 10)
    res = go.optimize(model, x, "factorize(rank=2)", calib=[x], on_error="raise")
    notes, rec = _notes(res)
    assert rec.status == "unchanged" and "3x3 kernel and 8 groups" in notes["0"].message
    assert "no layer was factorized" in notes[""].message


def test_conv_pairs_save_load_export_and_quantize(tmp_path):
    model, inputs = hf_model("resnet")
    calib = _pixels(inputs)
    res = go.optimize(model, inputs, "factorize(ratio=0.3,rank_multiple=2)", calib=calib, on_error="raise")
    assert res.export_onnx(tmp_path / "m.onnx").verified  # two Conv nodes per pair, checked in onnxruntime
    go.save(res, tmp_path / "f")
    loaded = go.load(tmp_path / "f", hf_model("resnet")[0])
    pair = next(m for m in loaded.modules() if isinstance(m, LowRankConv2d) and m.down.stride == (2, 2))
    assert pair.graphopt_spec()["stride"] == [2, 2]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, res.model(**inputs).last_hidden_state)
    with pytest.raises(NotLoadableError, match="go.save"):  # transformers would build dense convolutions
        res.model.save_pretrained(tmp_path / "hf")
    quant = go.optimize(res.model, inputs, "quantize(scheme=int8,method=gptq)", calib=calib, on_error="raise")
    pairs = [m for m in quant.model.modules() if isinstance(m, LowRankConv2d)]
    assert pairs and all(isinstance(p.down, QuantConv2d) and isinstance(p.up, QuantConv2d) for p in pairs)
    x = inputs["pixel_values"]
    with torch.no_grad():
        ref = res.model(**inputs).last_hidden_state
        assert F.cosine_similarity(quant.model(pixel_values=x).last_hidden_state.flatten(), ref.flatten(), 0) > 0.99
