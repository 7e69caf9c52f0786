"""Packed weight formats and QuantLinear: round trips, odd shapes, every backend against the reference."""

import pytest
import torch

from graphopt.nn.quant import (
    CLIP_FRACTIONS,
    QMAX,
    QuantConv2d,
    QuantLinear,
    dequantize,
    grouped,
    pack,
    quantize_weight,
    round_codes,
    unpack,
    weight_scales,
)
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


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 16), ("int4", 0)])
def test_rounding_error_is_half_a_step_inside_the_range_and_the_excess_outside(scheme, group):
    w = torch.randn(8, 50)
    codes, scale = quantize_weight(w, scheme, group)
    err = (dequantize(codes, scale, group) - w).abs()
    groups = scale.shape[1]
    assert groups == (1 if group == 0 else -(-50 // group))
    step = scale.repeat_interleave(group or 50, dim=1)[:, :50]
    lo, hi = CODE_RANGE[scheme]
    excess = torch.maximum(w - hi * step, lo * step - w).clamp_min(0)  # beyond the codes: clipped to the end
    assert bool((err <= torch.maximum(step / 2, excess) + 1e-6).all())
    if scheme == "int8":  # max|w| / 127: nothing is clipped
        assert float(err.max() / w.abs().max()) <= 1 / 254 + 1e-6


@pytest.mark.parametrize("group", [16, 0])
def test_int4_scales_minimise_each_groups_rounding_error(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    wg = grouped(w, group)
    top = wg.abs().amax(-1) / QMAX["int4"]

    def error(scale):
        return (wg - round_codes(wg, scale[..., None], "int4") * scale[..., None]).square().sum(-1)

    codes, scale = quantize_weight(w, "int4", group)
    assert bool((error(scale) <= error(top) + 1e-7).all())  # never worse than no clipping
    assert float(error(scale).sum()) < float(error(top).sum())
    assert float((scale < top).float().mean()) > 0.5  # Gaussian groups: most are clipped (measured 0.81, 1.0)
    for fraction in CLIP_FRACTIONS:  # and no fraction searched is better
        assert bool((error(scale) <= error(top * fraction) + 1e-7).all())
    # an importance that ignores each row's largest weight's column clips harder than none
    importance = torch.ones(64)
    importance[w.abs().argmax(1)] = 0
    weighted = weight_scales(w, "int4", group, importance=importance)
    assert float(weighted.sum()) < float(scale.sum())


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


def test_int8_mm_refuses_groups_when_the_layer_is_built():
    with pytest.raises(ValueError, match="one scale per channel.*use backend='auto'"):
        QuantLinear.from_linear(torch.randn(4, 32), None, scheme="int8", group_size=16, backend="int8_mm")


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


# --- w8a8, SmoothQuant factors, packed embeddings ------------------------------------------------------

def _onnx_dynamic_quantize(x):
    """ONNX DynamicQuantizeLinear written out from its specification (numpy, round half to even)."""
    import numpy as np

    a = x.numpy().astype(np.float32)
    lo, hi = min(a.min(), 0.0), max(a.max(), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return np.clip(np.rint(a / scale) + zero, 0, 255), scale, zero


def test_w8a8_layer_is_integer_arithmetic_on_onnx_style_codes():
    from graphopt.nn.quant import W8A8_QMAX

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 9)
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations="per_tensor")
    assert int(layer.codes().abs().max()) == W8A8_QMAX  # 7-bit weight codes (see W8A8_QMAX)
    x = torch.randn(2, 6, 40) * 3 + 1
    q, scale, zero = _onnx_dynamic_quantize(x)
    acc = (torch.from_numpy(q - zero).double() @ layer.codes().double().T)  # exact integers
    want = acc * float(scale) * layer.scale[:, 0].double() + lin.bias.double()
    with torch.no_grad():
        got, ref = layer(x), lin(x)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())  # and close to float


def test_per_token_w8a8_is_integer_arithmetic_on_symmetric_row_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 9)
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations="per_token")
    x = torch.randn(2, 6, 40) * torch.logspace(-2, 1, 6)[:, None]  # rows 1000x apart: one scale each
    scale = x.abs().amax(-1, keepdim=True) / 127.5  # compressed-tensors' convention: half the int8 range
    codes = torch.round(x / scale).clamp(-128, 127)
    assert float(codes.abs().max()) >= 127
    want = (codes.double() @ layer.codes().double().T) * scale.double() * layer.scale[:, 0].double() + lin.bias.double()
    with torch.no_grad():
        got = layer(x)
        per_tensor = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations="per_tensor")
        small = (slice(None), 0)  # the row 1000x below the largest: per tensor rounds most of it away
        err_token = float((got[small] - lin(x)[small]).abs().max())
        err_tensor = float((per_tensor(x)[small] - lin(x)[small]).abs().max())
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert err_token < err_tensor / 5


@pytest.mark.parametrize("activations", ["per_tensor", "per_token"])
def test_w8a8_needs_int8_per_channel(activations):
    with pytest.raises(ValueError, match="one scale per channel"):
        QuantLinear(16, 4, scheme="int8", group_size=8, activations=activations)
    with pytest.raises(ValueError, match="int8 weights"):
        QuantLinear(16, 4, scheme="int4", activations=activations)


@pytest.mark.parametrize("activations", ["none", "per_tensor"])
def test_smoothing_factor_keeps_the_function(activations):
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, 8)
    smooth = torch.rand(24) * 4 + 0.1
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations=activations,
                                    smooth=smooth)
    codes, scale = quantize_weight(lin.weight / smooth, "int8", 0, 63 if activations == "per_tensor" else None)
    assert torch.equal(layer.codes(), codes)  # the codes are those of W / smooth
    assert torch.allclose(layer.dequantized_weight(), dequantize(codes, scale, 0) * smooth)
    x = torch.randn(4, 24)
    with torch.no_grad():
        if activations == "none":  # (x * smooth) @ (W / smooth).T is x @ W_effective.T
            want = torch.nn.functional.linear(x, layer.dequantized_weight(), lin.bias)
            assert torch.allclose(layer(x), want, atol=1e-5)
        assert float((layer(x) - lin(x)).abs().max()) < 0.1 * float(lin(x).abs().max())
    rebuilt = build_module(module_spec(layer))
    rebuilt.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 16), ("int4", 0)])
def test_quant_embedding_looks_up_packed_rows(scheme, group):
    from graphopt.nn.quant import QuantEmbedding

    table = torch.nn.Embedding(50, 37, padding_idx=0)
    packed = QuantEmbedding.from_embedding(table, scheme=scheme, group_size=group)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(packed(ids), packed.weight[ids])
    codes, scale = quantize_weight(table.weight.detach(), scheme, group)  # its rounding: tested above
    assert torch.allclose(packed.weight, dequantize(codes, scale, group))
    with torch.no_grad():
        error, top = float((packed(ids) - table(ids)).abs().max()), float(table.weight.abs().max())
    bound = top / 254 if scheme == "int8" else top / 7  # int8: half a step; int4: a step (clipped extremes)
    assert error <= bound + 1e-6
    assert packed.weight_bytes < table.weight.numel() * 4 / (3.5 if scheme == "int8" else 4.5)
    rebuilt = build_module(module_spec(packed))
    rebuilt.load_state_dict(packed.state_dict())
    assert rebuilt.padding_idx == 0 and torch.equal(rebuilt(ids), packed(ids))


@pytest.mark.parametrize("conv", [dict(in_channels=6, out_channels=4, kernel_size=3, padding="same", dilation=2),
                                  dict(in_channels=6, out_channels=6, kernel_size=(3, 5), stride=2, groups=6),
                                  dict(in_channels=6, out_channels=8, kernel_size=1, groups=2, bias=False)])
@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 4), ("ternary", 0)])
def test_quant_conv2d_convolves_with_its_dequantized_weight_and_rebuilds_from_its_spec(conv, scheme, group):
    torch.manual_seed(0)
    float_conv = torch.nn.Conv2d(**conv)
    layer = QuantConv2d.from_conv(float_conv, scheme=scheme, group_size=group)
    w = float_conv.weight.detach()
    codes, scale = quantize_weight(w.reshape(w.shape[0], -1), scheme, group)
    assert torch.equal(layer.weight, dequantize(codes, scale, group).reshape(w.shape))
    x = torch.randn(2, 6, 11, 9)
    expected = torch.nn.functional.conv2d(x, layer.weight, float_conv.bias, float_conv.stride, float_conv.padding,
                                          float_conv.dilation, float_conv.groups)
    assert torch.equal(layer(x), expected) and layer.value_problems() == []
    per_byte = {"int8": 1, "int4": 2, "ternary": 4}[scheme]
    assert layer.weight_count == w.numel() and layer.qweight.shape == (w.shape[0], -(-codes.shape[1] // per_byte))
    assert layer.weight_bytes == layer.qweight.numel() + 4 * layer.scale.numel()
    rebuilt = build_module(module_spec(layer))
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x))


def test_quant_conv2d_names_bad_codes_and_unsupported_padding():
    layer = QuantConv2d.from_conv(torch.nn.Conv2d(4, 4, 3), scheme="int4", group_size=0)
    layer.qweight[0, 0] = 0xFF  # both nibbles code 7: in range; then a scale that no quantizer writes
    layer.scale[1, 0] = 0.0
    assert layer.value_problems() == ["1 scale(s) not finite and positive"]
    with pytest.raises(ValueError, match="pads with zeros; this layer pads with 'circular'"):
        QuantConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), scheme="int8",
                              group_size=0)
