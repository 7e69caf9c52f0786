"""Packed weight formats and QuantLinear: round trips, odd shapes, every backend against the reference."""

import pytest
import torch

from graphopt.nn.quant import QuantLinear, dequantize, pack, quantize_weight, unpack
from graphopt.nn.spec import build_module, module_spec

CODE_RANGE = {"int8": (-127, 127), "int4": (-8, 7), "ternary": (-1, 1)}


@pytest.mark.parametrize("scheme", ["int8", "int4", "ternary"])
@pytest.mark.parametrize("k", [1, 7, 32, 33, 130])
def test_pack_unpack_round_trip_every_code(scheme, k):
    lo, hi = CODE_RANGE[scheme]
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(lo, hi + 1, (5, k), generator=g, dtype=torch.int8)
    codes[0, :] = lo  # the extremes, where an offset or a sign bit would go wrong
    codes[1, :] = hi
    packed = pack(codes, scheme)
    per_byte = {"int8": 1, "int4": 2, "ternary": 4}[scheme]
    assert packed.shape == (5, -(-k // per_byte))
    assert torch.equal(unpack(packed, scheme, k), codes)


def test_int4_layout_low_nibble_first():
    codes = torch.tensor([[-8, 7, 0]], dtype=torch.int8)
    assert pack(codes, "int4").tolist() == [[0 | (15 << 4), 8]]  # offset +8: 0 and 15, then 8 (+ pad 0)


@pytest.mark.parametrize("scheme, group, bound", [("int8", 0, 1 / 254), ("int4", 16, 1 / 14), ("int4", 0, 1 / 14)])
def test_rounding_error_is_at_most_half_a_step(scheme, group, bound):
    w = torch.randn(8, 50)
    codes, scale = quantize_weight(w, scheme, group)
    err = (dequantize(codes, scale, group) - w).abs()
    groups = scale.shape[1]
    assert groups == (1 if group == 0 else -(-50 // group))
    # half a step of each row's (group's) scale, relative to that group's max |w|
    step = scale.repeat_interleave(group or 50, dim=1)[:, :50]
    assert bool((err <= step / 2 + 1e-6).all())
    assert float(err.max() / w.abs().max()) <= bound + 1e-6


def test_ternary_is_absmean():
    w = torch.tensor([[0.9, -1.1, 0.05, 0.0]])
    codes, scale = quantize_weight(w, "ternary", 0)
    assert torch.allclose(scale, w.abs().mean(1, keepdim=True))
    assert codes.tolist() == [[1, -1, 0, 0]]


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int8", 16), ("int4", 32), ("int4", 7), ("ternary", 0),
                                           ("ternary", 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_linear_matches_its_dequantized_reference_on_every_backend(scheme, group, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 11).to(dtype)  # K not a multiple of any group, N odd
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme=scheme, group_size=group)
    x = torch.randn(3, 5, 37).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), lin.bias.float())
    backends = ["torch", "auto"] + (["int8_mm"] if scheme == "int8" and group == 0 else [])
    for backend in backends:
        layer.backend = backend
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype and y.shape == (3, 5, 11)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert torch.allclose(y.float(), ref, atol=tol, rtol=tol), (backend, float((y.float() - ref).abs().max()))


def test_int8_mm_refuses_groups():
    layer = QuantLinear.from_linear(torch.randn(4, 32), None, scheme="int8", group_size=16, backend="int8_mm")
    with pytest.raises(ValueError, match="one scale per channel"):
        layer(torch.randn(2, 32))


def test_spec_round_trip_keeps_format_and_buffers():
    layer = QuantLinear.from_linear(torch.randn(6, 10), torch.randn(6), scheme="int4", group_size=4)
    rebuilt = build_module(module_spec(layer))
    assert type(rebuilt) is QuantLinear and rebuilt.graphopt_spec() == layer.graphopt_spec()
    assert rebuilt.qweight.shape == layer.qweight.shape and rebuilt.qweight.dtype == torch.uint8
    assert rebuilt.scale.shape == layer.scale.shape == (6, 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        QuantLinear(4, 4, scheme="int3")
    with pytest.raises(ValueError, match="unknown backend"):
        QuantLinear(4, 4, backend="cuda")
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(4, 4, group_size=-1)
