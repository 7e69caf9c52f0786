"""Norm recognition: LayerNorm / RMSNorm found by behaviour (a probe), never by class name."""

import pytest
import torch
from torch import nn

from graphopt.analysis.norms import NormInfo, probe_norm


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
