"""Packed low-bit weight formats and the ``graphopt::quant_linear`` op.

Formats (symmetric, one scale per output row and group of ``group_size`` input columns; a last
group shorter than ``group_size`` when ``in_features`` is not a multiple of it; ``group_size=0``
is one scale per output channel):

- ``int8``: one signed byte per weight, codes in [-127, 127], ``scale = max|w| / 127``.
- ``int4``: codes in [-8, 7], stored offset by +8 as unsigned nibbles, two per byte: column ``2j``
  in the low nibble of byte ``j``, column ``2j + 1`` in the high one (the layout of onnxruntime's
  ``MatMulNBits`` with its default zero point 8); ``scale`` at most ``8/7 · max|w| / 7``, chosen per group to
  round it best (:func:`graphopt.nn.quant.weight_scales`).
- ``ternary``: codes in {-1, 0, 1} (BitNet b1.58's absmean rounding: ``scale = mean|w|``), stored
  offset by +1 in 2 bits, four per byte: column ``4j + i`` at bits ``2i`` of byte ``j``.

Activations (``activations``): ``"none"`` (weight-only: dequantize, then a float matmul) or
``"per_tensor"`` (w8a8: each call quantizes its input to uint8 with one scale and zero point per tensor,
exactly as ONNX ``DynamicQuantizeLinear`` does, then multiplies integer codes) or ``"per_token"``
(w8a8 with one symmetric int8 scale per row of the input, ``max|x_row| / 127.5``: finer, as LLM w8a8
schemes use).

``torch.ops.graphopt.quant_linear`` runs the reference, torch's packed int8 CPU kernel
(``backend="int8_mm"``) or graphopt's Triton kernels (``backend="triton"``, :mod:`.quant_triton`);
:data:`ONNX_TRANSLATIONS` exports it as one ``graphopt.quant::QuantLinear`` node that
:mod:`graphopt.emit.onnx_quant` lowers to standard or onnxruntime operators.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from graphopt.kernels.activations import dynamic_quantize_uint8, per_token_quantize_int8
from graphopt.kernels.quant_cpu import (
    CPU_BACKENDS,
    int8pack_linear,
    int_mm_linear,
    onednn_linear,
    runs_on,
    why_not,
)
from graphopt.kernels.quant_triton import int8_matmul, weight_only_matmul

SCHEMES: tuple[str, ...] = ("int8", "int4", "ternary")
BITS = {"int8": 8, "int4": 4, "ternary": 2}
QMAX = {"int8": 127, "int4": 7}
CODE_RANGE = {"int8": (-127, 127), "int4": (-8, 7), "ternary": (-1, 1)}
PER_BYTE = {"int8": 1, "int4": 2, "ternary": 4}
ACTIVATIONS = ("none", "per_tensor", "per_token")
W8A8_ACTIVATIONS = ("per_tensor", "per_token")
# w8a8 weight codes stay in [-63, 63]: onnxruntime's uint8 x int8 kernel on x86 CPUs without VNNI adds
# pairs of products in int16 (``vpmaddubsw``), which saturates above 32767 = 2 * 255 * 64 (measured here:
# errors up to 25% of the output with full-range codes; none with these).
W8A8_QMAX = 63
ONNX_DOMAIN = "graphopt.quant"


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def grouped(w: Tensor, group_size: int) -> Tensor:
    """``[out, in]`` -> ``[out, groups, g]``, the last group zero-padded."""
    out, k = w.shape
    g = k if group_size <= 0 else group_size
    pad = n_groups(k, group_size) * g - k
    return F.pad(w, (0, pad)).reshape(out, -1, g)


def pack(codes: Tensor, scheme: str) -> Tensor:
    """Codes ``[rows, cols]`` (int8) -> the stored layout (see the module docstring)."""
    if scheme == "int8":
        return codes.to(torch.int8).contiguous()
    per, offset, bits = PER_BYTE[scheme], -CODE_RANGE[scheme][0], BITS[scheme]
    rows, k = codes.shape
    padded = F.pad(codes.to(torch.int16) + offset, (0, (-k) % per)).reshape(rows, -1, per)
    packed = torch.zeros(padded.shape[:2], dtype=torch.int16, device=codes.device)
    for i in range(per):
        packed |= padded[..., i] << (bits * i)
    return packed.to(torch.uint8)


def unpack(packed: Tensor, scheme: str, in_features: int) -> Tensor:
    """The stored layout -> codes ``[rows, in_features]`` (int8)."""
    if scheme == "int8":
        return packed[..., :in_features].to(torch.int8)
    per, offset, bits = PER_BYTE[scheme], -CODE_RANGE[scheme][0], BITS[scheme]
    p = packed.to(torch.int32)  # int32: the shifts export to ONNX ops onnxruntime runs (int16 has no Where)
    parts = [(p >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    codes = torch.stack(parts, -1).reshape(*packed.shape[:-1], -1)[..., :in_features] - offset
    return codes.to(torch.int8)


def dequantize(codes: Tensor, scale: Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Codes ``[rows, in]`` times their group's scale -> weights ``[rows, in]``."""
    k = codes.shape[1]
    values = grouped(codes.to(torch.float32), group_size) * scale.to(torch.float32)[..., None]
    return values.reshape(codes.shape[0], -1)[:, :k].to(dtype)


#: the float weights :func:`dequantize_rows` makes at a time outside graphs (bytes): unpacking goes through int32,
#: about 12 bytes a weight, so a 8192 x 2048 int4 layer at once held ~200 MiB beside its 64 MiB result
DEQUANTIZE_CHUNK = 16 << 20


def dequantize_rows(qweight: Tensor, scale: Tensor, scheme: str, group_size: int, width: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``dequantize(unpack(qweight))``: the ``[rows, width]`` weights the packed codes stand for, in ``dtype``.

    Eagerly, a slice of rows at a time into the result (the same values: each row is computed alone), so
    what it holds beside the result is one slice's unpacking; traced (export, compile), in one piece.
    """
    rows = qweight.shape[0]
    step = max(1, DEQUANTIZE_CHUNK // max(1, width * 4))
    if rows <= step or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return dequantize(unpack(qweight, scheme, width), scale, group_size, dtype)
    out = torch.empty(rows, width, dtype=dtype, device=qweight.device)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        out[start:end] = dequantize(unpack(qweight[start:end], scheme, width), scale[start:end], group_size, dtype)
    return out


def quant_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int,
                           in_features: int, activations: str = "none") -> Tensor:
    """``x @ W.T`` for the packed ``W`` (no bias), in ``x``'s dtype."""
    if activations not in W8A8_ACTIVATIONS:
        return F.linear(x, dequantize_rows(qweight, scale, scheme, group_size, in_features, x.dtype))
    if group_size > 0:
        raise ValueError(f"activations={activations!r} needs one weight scale per output channel (group_size=0)")
    if activations == "per_token":
        q, x_scale = per_token_quantize_int8(x)
    else:
        q, x_scale, zero = dynamic_quantize_uint8(x)
        q = q - zero
    codes = unpack(qweight, scheme, in_features)
    acc = F.linear(q, codes.to(torch.float32))  # integer-valued: x codes (less the zero point) . w codes
    return (acc * (x_scale * scale[:, 0].to(torch.float32))).to(x.dtype)


def quant_linear_impl(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
                      activations: str, backend: str) -> Tensor:
    """``x @ W.T`` for packed weights ``W`` (see the module docstring); ``backend`` picks the kernel. The body of
    the op ``graphopt::quant_linear``; layers call it directly where no graph or autograd needs the op
    (:func:`needs_op`)."""
    if backend == "triton":
        return _quant_linear_triton(x, qweight, scale, scheme, group_size, in_features, activations)
    if backend in CPU_BACKENDS:
        problem = why_not(backend, scheme, group_size, activations) or runs_on(backend, x)
        if problem:
            raise ValueError(problem)
        if backend == "int8_mm":
            return int8pack_linear(x, qweight, scale, in_features)
        if backend == "onednn" and not torch.compiler.is_compiling():  # traced: int_mm's aten ops, same integers
            return onednn_linear(x, qweight, scale, in_features, activations)
        return int_mm_linear(x, qweight, scale, in_features, activations)
    if torch.compiler.is_compiling() and activations == "none" and one_row_reduces(x, scheme, group_size, in_features):
        return one_row_linear(x, qweight, scale, scheme, group_size, in_features)
    return quant_linear_reference(x, qweight, scale, scheme, group_size, in_features, activations)


def one_row_reduces(x: Tensor, scheme: str, group_size: int, in_features: int) -> bool:
    """Whether :func:`one_row_linear` computes a weight-only layer for ``x``: one input row on CPU, and groups
    that hold whole bytes of codes."""
    group = group_size or in_features
    return (x.device.type == "cpu" and math.prod(x.shape[:-1]) == 1 and in_features % group == 0
            and group % PER_BYTE[scheme] == 0)


def one_row_linear(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int
                   ) -> Tensor:
    """The reference's ``x @ W.T`` for one input row, written as one reduction over the packed codes: what
    ``torch.compile`` traces for a weight-only layer at batch 1 (LLM decoding). Inductor fuses the unpacking,
    the scales and the dot products into one loop that reads each packed byte once, where dequantize-then-matmul
    writes and reads a float32 copy of the weight (inductor decomposes float matmuls of one row the same way:
    ``decompose_mem_bound_mm``). Each byte's ``PER_BYTE`` codes multiply the input's interleaved elements
    directly, so no unpacked code tensor is built (stacking them defeated the fusion: 7x slower, measured).
    The input's elements are first gathered by their place in the byte with ``torch.cat``, which inductor
    writes to a buffer: left as strided views, they are inlined into the reduction's loads with stride
    ``PER_BYTE``, and inductor then vectorizes across output rows through byte transposes (an int4 g64 MLP block
    of SmolLM2: 4.1 ms, against 0.24 ms with the buffer; fp32: 0.4 ms). Float32 sums in another order than the
    matmul's: equal to the reference within float32 rounding."""
    per, offset, bits = PER_BYTE[scheme], -CODE_RANGE[scheme][0], BITS[scheme]
    group = group_size or in_features
    out, groups = qweight.shape[0], in_features // group
    packed = qweight[:, :in_features // per].reshape(out, groups, group // per)
    if per == 1:
        codes = [packed.to(torch.float32)]
    else:
        wide = packed.to(torch.int32)
        codes = [(((wide >> (bits * i)) & ((1 << bits) - 1)) - offset).to(torch.float32) for i in range(per)]
    interleaved = x.reshape(groups, group // per, per).to(torch.float32)
    xs = torch.cat([interleaved[..., i] for i in range(per)]).reshape(per, groups, group // per)
    sums = sum(xs[i] * codes[i] for i in range(per)).sum(-1)  # [out, groups]: each group's dot product
    y = (sums * scale.to(torch.float32)).sum(-1)
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


@torch.library.custom_op("graphopt::quant_linear", mutates_args=())
def quant_linear(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
                 activations: str, backend: str) -> Tensor:
    """``x @ W.T`` for packed weights ``W`` as one op: what export, ONNX translation, FLOP counting and the
    straight-through backward see (:func:`quant_linear_impl` computes it)."""
    return quant_linear_impl(x, qweight, scale, scheme, group_size, in_features, activations, backend)


def needs_op(x: Tensor, backend: str) -> bool:
    """Whether a layer must call the op rather than :func:`quant_linear_impl`: under ``torch.export`` (its
    graphs keep the one node ONNX translates), under a dispatch mode (FLOP counting, fake tensors), when the
    input needs a gradient (the op's straight-through backward), and for Triton under ``torch.compile``.
    Elsewhere the plain function saves the op's dispatch (about 70 us a call in eager mode, as much as a small
    layer's matmul), and ``torch.compile`` traces the reference and ``int_mm`` paths (``onednn`` as ``int_mm``:
    its reordered weight is no tensor a graph can hold) as the aten ops they are made of, so inductor fuses the
    unpacking, dequantization and input quantization into its own kernels."""
    if torch.compiler.is_exporting() or (torch.is_grad_enabled() and x.requires_grad):
        return True
    if torch.compiler.is_compiling():
        return backend == "triton"
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None or bool(
        torch.utils._python_dispatch._get_current_dispatch_mode())


def _quant_linear_triton(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
                         activations: str) -> Tensor:
    """The Triton kernels (:mod:`graphopt.kernels.quant_triton`): weight-only, or w8a8 with the input quantized
    exactly as the reference does: per token (symmetric int8), or per tensor (uint8 codes ``q``, zero point
    ``z``: the kernel multiplies ``q - 128`` and adds ``(128 - z) * colsum(W)``)."""
    if activations not in W8A8_ACTIVATIONS:
        return weight_only_matmul(x, qweight, scale, scheme, group_size, in_features)
    flat = x.reshape(-1, in_features)
    rows = flat.shape[0]
    if activations == "per_token":
        q, x_scale = per_token_quantize_int8(flat)
        codes, offset, x_scale = q.to(torch.int8), torch.zeros(rows, dtype=torch.int32, device=x.device), x_scale[:, 0]
    else:
        q, x_scale, zero = dynamic_quantize_uint8(flat)
        codes = (q - 128).to(torch.int8)
        offset, x_scale = (128 - zero).to(torch.int32).expand(rows), x_scale.expand(rows)
    y = int8_matmul(codes, qweight, x_scale, offset, scale[:, 0].to(torch.float32), x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@quant_linear.register_fake
def _(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
      activations: str, backend: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@register_flop_formula(torch.ops.graphopt.quant_linear)
def _quant_linear_flops(x_shape: tuple[int, ...], qweight_shape: tuple[int, ...], *args: object,
                        **kwargs: object) -> int:
    """The FLOPs of the float matmul it replaces (torch's FlopCounterMode reads this)."""
    in_features = int(args[3])  # scale, scheme, group_size, in_features
    return 2 * math.prod(x_shape[:-1]) * in_features * qweight_shape[0]


def _setup_context(ctx: object, inputs: tuple, output: Tensor) -> None:
    x, qweight, scale, scheme, group_size, in_features, *_ = inputs
    ctx.weight = (qweight, scale, scheme, group_size, in_features)  # type: ignore[attr-defined]


def _backward(ctx: object, grad: Tensor) -> tuple:
    """Straight-through: the gradient of ``x @ W.T`` for the dequantized ``W`` (weights are frozen)."""
    qweight, scale, scheme, group_size, in_features = ctx.weight  # type: ignore[attr-defined]
    w = dequantize_rows(qweight, scale, scheme, group_size, in_features, grad.dtype)
    return grad @ w, None, None, None, None, None, None, None


quant_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("graphopt::dequantize_packed", mutates_args=())
def dequantize_packed(qweight: Tensor, scale: Tensor, scheme: str, group_size: int, width: int) -> Tensor:
    """The ``[rows, width]`` weights that packed codes and their scales stand for, in ``scale``'s dtype (what
    :class:`graphopt.nn.quant.QuantConv2d` convolves with). An op, so that ONNX export keeps the int8 / int4
    codes in the file (:mod:`graphopt.emit.onnx_quant`) instead of folding them into float weights."""
    return dequantize_rows(qweight, scale, scheme, group_size, width, scale.dtype)


@dequantize_packed.register_fake
def _(qweight: Tensor, scale: Tensor, scheme: str, group_size: int, width: int) -> Tensor:
    return scale.new_empty((qweight.shape[0], width))


#: the attributes of each ``graphopt.quant`` marker, in order (all INT but ``scheme`` and ``activations``)
MARKER_ATTRIBUTES = {"QuantLinear": ("scheme", "group_size", "in_features", "activations"),
                     "DequantizePacked": ("scheme", "group_size", "width")}


def _onnx_quant_linear(x, qweight, scale, scheme: str, group_size: int, in_features: int, activations: str,
                       backend: str):
    """One ``graphopt.quant::QuantLinear`` node; :mod:`graphopt.emit.onnx_quant` lowers it after export."""
    from onnxscript import values

    marker = values.Op(values.Opset(ONNX_DOMAIN, 1), "QuantLinear", _marker_schema("QuantLinear"))
    return marker(x, qweight, scale, scheme=scheme, group_size=group_size, in_features=in_features,
                  activations=activations)


def _onnx_dequantize_packed(qweight, scale, scheme: str, group_size: int, width: int):
    """One ``graphopt.quant::DequantizePacked`` node; :mod:`graphopt.emit.onnx_quant` lowers it after export."""
    from onnxscript import values

    marker = values.Op(values.Opset(ONNX_DOMAIN, 1), "DequantizePacked", _marker_schema("DequantizePacked"))
    return marker(qweight, scale, scheme=scheme, group_size=group_size, width=width)


@functools.cache
def _marker_schema(name: str):  # noqa: ANN202 - onnx.defs.OpSchema
    """The schema of the ``graphopt.quant::<name>`` marker (registered with onnx once)."""
    import onnx

    param, attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    kind = {"scheme": onnx.defs.OpSchema.AttrType.STRING, "activations": onnx.defs.OpSchema.AttrType.STRING}
    inputs = [param("qweight", "Q"), param("scale", "T")]
    schema = onnx.defs.OpSchema(
        name, ONNX_DOMAIN, 1, doc=f"graphopt's packed {name} (lowered after export)",
        inputs=[param("x", "T"), *inputs] if name == "QuantLinear" else inputs,
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(double)"], "float"),
                          ("Q", ["tensor(int8)", "tensor(uint8)"], "packed codes")],
        attributes=[attr(a, kind.get(a, onnx.defs.OpSchema.AttrType.INT), "") for a in MARKER_ATTRIBUTES[name]])
    with contextlib.suppress(onnx.defs.SchemaError):  # already registered (by another copy of this module)
        onnx.defs.register_schema(schema)
    return onnx.defs.get_schema(name, 1, ONNX_DOMAIN)


ONNX_TRANSLATIONS = {torch.ops.graphopt.quant_linear.default: _onnx_quant_linear,
                     torch.ops.graphopt.dequantize_packed.default: _onnx_dequantize_packed}
