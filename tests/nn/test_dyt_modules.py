"""DyT and ELN modules: their functions, the fast inference paths, the fit to a norm's outputs, JSON specs."""

import math

import pytest
import torch
from torch import nn

from graphopt.nn.dyt import ELN, DyT, fit_elementwise, isru
from graphopt.nn.spec import build_module, module_spec


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
