"""The proof that a per-channel scale on one layer's output reaches another layer's input unchanged
(graphopt/analysis/channel_scale.py), on hand-built graphs and HF models it was not written for."""

import pytest
import torch
from torch import nn

from graphopt.analysis.channel_scale import producers_of, scale_path
from graphopt.frontend.export import export_program
from graphopt.helpers.zoo import hf_model


class Path(nn.Module):
    """``b(middle(a(x)))`` with ``a``: 8 -> 12 channels and ``b``: 12 -> 4."""

    def __init__(self, middle):
        super().__init__()
        self.a, self.b, self.middle = nn.Linear(8, 12), nn.Linear(12, 4), middle

    def forward(self, x):
        return self.b(self.middle(self.a(x), x))


MIDDLES = {
    "heads and back": (lambda y, x: y.view(2, 5, 3, 4).transpose(1, 2).contiguous().transpose(1, 2).reshape(2, 5, 12), ""),
    "times a mask": (lambda y, x: y * (x[..., :1] > 0), ""),
    "relu": (lambda y, x: torch.relu(y), ""),
    "probs @ values": (lambda y, x: torch.softmax(x[..., :5] @ x[..., :5].transpose(1, 2), -1) @ y, ""),
    "a residual": (lambda y, x: y + x.repeat(1, 1, 2)[..., :12], "aten.add"),
    "tanh": (lambda y, x: torch.tanh(y), "aten.tanh"),
    "a clamp the data never reaches": (lambda y, x: torch.clamp(y, -100, 100), "aten.clamp"),
    "channels swapped": (lambda y, x: y.view(2, 5, 2, 6).transpose(-1, -2).reshape(2, 5, 12), "one to one"),
    "summed over channels": (lambda y, x: y * y.sum(-1, keepdim=True), "aten.sum"),
    "squared": (lambda y, x: y * y, "scaled values by scaled values"),
}


class Middle(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y, x):
        return self.fn(y, x)


@pytest.mark.parametrize("case", list(MIDDLES))
def test_the_proof_accepts_exactly_the_paths_that_carry_a_positive_channel_scale(case):
    fn, refusal = MIDDLES[case]
    model = Path(Middle(fn)).eval()
    x = torch.randn(2, 5, 8)
    ep = export_program(model, (x,))
    assert producers_of(ep, "b") == ["a"]
    why = scale_path(ep, "a", "b")
    assert (why == "") == (refusal == ""), why
    assert refusal in why
    if not why:  # what the proof promises, checked numerically: scaling a's rows scales b's input columns
        s = torch.rand(12) + 0.5
        scaled = Path(Middle(fn)).eval()
        scaled.load_state_dict(model.state_dict())
        with torch.no_grad():
            scaled.a.weight.mul_(s[:, None]), scaled.a.bias.mul_(s)
            scaled.b.weight.div_(s)
            torch.testing.assert_close(scaled(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_output_read_elsewhere_is_refused():
    class Both(Path):
        def forward(self, x):
            y = self.a(x)
            return self.b(y), y

    ep = export_program(Both(nn.Identity()).eval(), (torch.randn(2, 8),))
    assert "reaches the model's outputs" in scale_path(ep, "a", "b")


@pytest.mark.parametrize("name, consumer, producer, proven", [
    ("bert", "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.value", True),
    ("bert", "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.query", False),
    ("bert", "encoder.layer.0.output.dense", "encoder.layer.0.intermediate.dense", False),  # through GELU
    ("llama", "layers.0.mlp.down_proj", "layers.0.mlp.up_proj", True),
    ("llama", "layers.0.mlp.down_proj", "layers.0.mlp.gate_proj", False),  # through SiLU
    ("llama", "layers.1.self_attn.q_proj", "layers.0.mlp.down_proj", False),  # a residual add
    ("opt", "decoder.layers.0.self_attn.out_proj", "decoder.layers.0.self_attn.v_proj", True),
])
def test_hf_attention_and_mlp_paths(name, consumer, producer, proven):
    model, inputs = hf_model(name)
    ep = export_program(model, inputs)
    assert producer in producers_of(ep, consumer)
    assert (scale_path(ep, producer, consumer) == "") is proven
