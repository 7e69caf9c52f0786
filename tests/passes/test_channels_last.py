"""channels_last: Before (NCHW convolution weights) -> Expected (channels-last weights, the same outputs), on a
CNN of our own with the layers it must leave alone, on HF's ResNet, and through save/load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.infra.program import EditError, Program


def is_channels_last(t: torch.Tensor) -> bool:
    if t.dim() not in (4, 5):
        return False
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.stride() == torch.empty_like(t, memory_format=fmt).stride()  # the canonical strides, not merely allowed


class StandardizedConv(nn.Conv2d):
    """Weight standardization, as BiT's convolutions do: its forward views the weight."""

    def forward(self, x):
        w = self.weight.view(self.out_channels, -1)
        w = ((w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5)).view_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.ws = StandardizedConv(24, 24, 3, padding=1)
        self.wn = parametrizations.weight_norm(nn.Conv2d(24, 24, 1))
        self.up = nn.ConvTranspose2d(24, 8, 2, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu6(self.pw(F.relu6(self.dw(F.relu6(self.stem(x))))))
        y = self.up(self.wn(self.ws(y)) + y)
        return self.head(y.mean((2, 3)))


def test_converts_the_stock_convolutions_and_skips_the_rest_with_their_reasons():
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    calls = []
    model.pw.register_forward_hook(lambda *_: calls.append("pw"))
    res = go.optimize(model, x, "channels_last", measure=False)
    record = res.report.passes[0]
    assert record.status == "ok" and record.stats == {"converted": 4}
    new = res.model
    assert [n for n in ("stem", "dw", "pw", "up") if is_channels_last(getattr(new, n).weight)] == ["stem", "dw", "pw",
                                                                                                    "up"]
    skipped = {d.target: d.message for d in record.diagnostics if d.level == "skipped"}
    assert set(skipped) == {"ws", "wn"}
    assert "overrides the convolution's forward" in skipped["ws"] and "parametrized" in skipped["wn"]
    assert not is_channels_last(new.ws.weight) and type(new.ws) is StandardizedConv
    fresh = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(new(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    assert calls, "the hook on the converted layer was lost"
    assert not any(is_channels_last(getattr(model, n).weight) for n in ("stem", "dw", "pw", "up"))  # the caller's
    assert [(e.op, e.target, e.data) for e in res.program.edits] == [
        ("set_layout", f"{n}.weight", {"memory_format": "channels_last"}) for n in ("stem", "dw", "pw", "up")]


def test_keeps_the_parameter_object_and_ties():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    model[2].weight = model[0].weight
    res = go.optimize(model, torch.randn(1, 4, 8, 8), "channels_last", measure=False, inplace=True)
    assert res.model is model and model[2].weight is model[0].weight and is_channels_last(model[0].weight)
    assert isinstance(model[0].weight, nn.Parameter)


def test_a_weight_shared_with_a_skipped_layer_is_left_alone():
    model = nn.Sequential(StandardizedConv(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    model[1].weight = model[0].weight
    res = go.optimize(model, torch.randn(1, 4, 8, 8), "channels_last", measure=False)
    record = res.report.passes[0]
    assert record.status == "unchanged" and not is_channels_last(res.model[1].weight)
    assert "shared with '0'" in {d.target: d.message for d in record.diagnostics}["1"]


def test_a_model_without_convolutions_is_unchanged_and_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)).eval()
    res = go.optimize(model[:1], torch.randn(2, 4), "channels_last", measure=False)
    record = res.report.passes[0]
    assert record.status == "unchanged" and "no 2-D or 3-D convolutions" in record.diagnostics[0].message


def test_hf_resnet_converts_and_the_saved_model_loads_channels_last(tmp_path):
    model, inputs = hf_model("resnet", layers=3)
    res = go.optimize(model, inputs, "fold_bn,channels_last", measure=False)
    convs = [m for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(is_channels_last(m.weight) for m in convs)
    assert res.report.passes[1].stats["converted"] == len(convs)
    go.save(res, tmp_path / "m")
    loaded = go.load(tmp_path / "m", hf_model("resnet", layers=3, seed=7)[0])
    assert all(is_channels_last(m.weight) for m in loaded.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).pooler_output, res.model(**inputs).pooler_output)


def test_set_layout_refuses_a_tensor_of_another_rank():
    program = Program(nn.Linear(3, 3), torch.randn(1, 3))
    with pytest.raises(EditError, match="channels_last is for 4-D tensors"):
        program.set_layout("weight", "channels_last")
    with pytest.raises(EditError, match="unknown memory format 'nhwc'"):
        program.set_layout("weight", "nhwc")
