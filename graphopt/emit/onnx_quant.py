"""Lower graphopt's quantized-layer markers in an exported ONNX graph to runnable operators.

The exporter writes each :class:`graphopt.nn.quant.QuantLinear` as one ``graphopt.quant::QuantLinear``
node over its packed codes and scales (``graphopt.kernels.quant``), and the weights of each
:class:`graphopt.nn.quant.QuantConv2d` as one ``graphopt.quant::DequantizePacked`` node (its codes as
``[out, in / groups * kh * kw]`` rows) followed by the traced ``Reshape`` and ``Conv``; the latter always
becomes ``Cast`` of the int8 / int4 codes times their scales (per row, or per group along the row): the
file keeps the codes, and onnxruntime folds those ordinary ops into float weights when it loads the file,
so the convolutions run at float speed. (A ``DequantizeLinear`` there is not folded while onnxruntime's QDQ
handling is on: it dequantized the weights on every call, 3.5x the float model's time on EfficientNet.)
:func:`lower_quantized` replaces each QuantLinear marker, in the exporter's in-memory ``onnx_ir`` model
before the file is written, with, by ``quant_format``:

- ``"qdq"`` (default, standard ONNX, opset 21): ``DequantizeLinear`` of the int8 / int4 codes
  (``[in, out]``; per-axis scales, or blocked ones with ``block_size`` = the group size) feeding a
  ``MatMul``. onnxruntime fuses an int4 blocked ``DequantizeLinear -> MatMul`` into its 4-bit kernel.
  Ternary codes are stored as int4 (ONNX has no 2-bit type that onnxruntime reads).
  onnxruntime fuses ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` at the session option
  ``session.qdq_matmulnbits_accuracy_level`` (its default 4 rounds activations to int8 in the
  kernel); the export is verified with that option set to ``accuracy_level``.
- ``"matmulnbits"``: onnxruntime's ``com.microsoft.MatMulNBits`` (int4 with a power-of-two group size
  of at least 16: graphopt's nibble layout is that operator's, with its default zero point 8).
  ``accuracy_level`` is passed through: 0 (the default: float compute) or 4 (onnxruntime quantizes
  the activations to int8 inside the kernel: faster, less exact).

w8a8 layers (``activations="per_tensor"``) become what onnxruntime's ``quantize_dynamic`` writes:
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul``, which onnxruntime fuses and runs on its
integer kernels, in either format. Per-token w8a8 (``"per_token"``) computes each row's scale with
``Abs -> ReduceMax -> Max -> Div``, rounds with one blocked ``QuantizeLinear`` (a block per row) to
uint8 codes with zero point 128 (int8 codes + 128: exact) and runs ``MatMulInteger``. The result
equals graphopt's torch model up to float rounding.

How: one onnxscript pattern rule (``onnxscript.rewriter.pattern.RewriteRule``) matches the marker with its
four attributes; its check refuses, with :class:`QuantLoweringError`, what the format cannot express (a
marker left in place would give a file no runtime loads), and its replacement builds the operators and
the new initializers, computed from the packed ones, through the rewriter's builder. A single-node
pattern whose replacement reads constants fits the rewriter well: it finds the node, binds the
attributes, rewires the consumers and graph outputs and adds the opset of ``com.microsoft``. Each layer
is lowered on its own; onnx_ir's shared passes then make layers that read one tensor share its work:
equal constants become one initializer (q, k and v carry separate but equal SmoothQuant factors), after
which common-subexpression elimination leaves one ``Mul`` by that factor and one
``DynamicQuantizeLinear`` (or per-token chain) per input, and dead-code removal drops the packed
initializers and the ``graphopt.quant`` opset.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from graphopt.kernels.quant import MARKER_ATTRIBUTES, ONNX_DOMAIN, unpack

if TYPE_CHECKING:
    import onnx_ir as ir

log = logging.getLogger(__name__)

QuantFormat = Literal["qdq", "matmulnbits"]
QUANT_FORMATS: tuple[str, ...] = ("qdq", "matmulnbits")
QDQ_OPSET = 21
QDQ_ACCURACY_ENTRY = "session.qdq_matmulnbits_accuracy_level"
#: Relative error allowed between onnxruntime and torch for graphs with w8a8 layers. A float
#: difference of one ulp flips an activation code, and flips add up through the layers: on
#: all-MiniLM-L6-v2 the same graph measured 3e-7 to 5e-2 between onnxruntime's optimisation levels and
#: torch, about half the error of w8a8 itself. Lowering bugs (a wrong scale or layout) give O(1); single
#: layers are checked elementwise by the tests.
W8A8_REL_L2 = 0.1
#: Initializers of up to this many elements are merged when equal (the exporter's own limit is 1024):
#: SmoothQuant factors have one element per input feature, which can be tens of thousands.
SHARED_CONSTANT_LIMIT = 1 << 16
_DYNAMIC = ("per_tensor", "per_token")


class QuantLoweringError(ValueError):
    """A quantized layer cannot be written in the requested ONNX format (the message says what to use)."""


def qdq_session_config(accuracy_level: int) -> dict[str, str]:
    """onnxruntime session entries under which a QDQ file computes as graphopt's torch model does.

    onnxruntime fuses weight-only ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` and, unless told,
    runs it at accuracy level 4 (activations rounded to int8 inside the kernel).
    """
    return {QDQ_ACCURACY_ENTRY: str(accuracy_level)}


def lowering_note(count: int, dynamic: int, quant_format: str, accuracy_level: int) -> str:
    if dynamic == count:
        return f"{count} w8a8 layers written as integer MatMulInteger (activations quantized in the graph)"
    if quant_format == "matmulnbits":
        return f"{count} quantized layers written as MatMulNBits (accuracy_level={accuracy_level})"
    return (f"{count} quantized layers written as QDQ; verified with onnxruntime session option "
            f"{QDQ_ACCURACY_ENTRY}={accuracy_level} (onnxruntime's default, 4, computes weight-only layers "
            "with int8 activations: faster, less exact)")


def lower_quantized(model: ir.Model, quant_format: QuantFormat = "qdq", accuracy_level: int = 0) -> tuple[int, int]:
    """Replace every ``graphopt.quant::QuantLinear`` node of the onnx_ir ``model`` (in place), then run
    ``onnx.checker`` on it.

    Returns how many were lowered, and how many of those quantize their activations (w8a8). A model
    without markers is left as it is.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.rewriter import pattern

    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format={quant_format!r}: choose from {', '.join(QUANT_FORMATS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level}: onnxruntime accepts 0 (unset), 1 fp32, 2 fp16, "
                         "3 bf16 or 4 int8")
    markers = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if _is_marker(n)]
    if not markers:
        return 0, 0
    dynamic = sum(_string_attr(n, "activations") in _DYNAMIC for n in markers)
    rule = _QuantLinearRule(quant_format, accuracy_level)
    count = pattern.RewriteRuleSet([pattern.RewriteRule(rule.target, rule.replacement, rule.check),
                                    pattern.RewriteRule(_dequantize_packed, _dequantize_packed_lowered,
                                                        _dequantize_packed_check)]).apply_to_model(model)
    left = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if _is_marker(n)]
    if left:  # the pattern did not match (an attribute missing or added): the file would run nowhere
        raise QuantLoweringError(f"{len(left)} {ONNX_DOMAIN} nodes could not be lowered (e.g. {left[0].op_type} "
                                 f"{left[0].name!r} with attributes {sorted(left[0].attributes)})")
    ir.passes.Sequential(
        common.DeduplicateInitializersPass(size_limit=SHARED_CONSTANT_LIMIT),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),  # the packed codes and scales, and now unused constants
        common.RemoveUnusedOpsetsPass(),  # graphopt.quant
    )(model)
    model.opset_imports[""] = max(model.opset_imports.get("", QDQ_OPSET), QDQ_OPSET)
    common.CheckerPass()(model)
    log.info("lowered %d quantized layers to %s", count, quant_format)
    return count, dynamic


def _is_marker(node: ir.Node) -> bool:
    return node.domain == ONNX_DOMAIN and node.op_type in MARKER_ATTRIBUTES


def _string_attr(node: ir.Node, name: str) -> str | None:
    attr = node.attributes.get(name)
    return attr.value if attr is not None else None


def _constant(value: ir.Value) -> np.ndarray:
    """The array behind ``value``: an initializer or ``Constant``, possibly through Identity / Cast nodes."""
    import onnx_ir as ir

    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is not None and node.domain == "" and node.op_type in ("Identity", "Cast"):
        array = _constant(node.inputs[0])
        if node.op_type == "Cast":
            array = array.astype(ir.DataType(node.attributes["to"].value).numpy())
        return array
    raise QuantLoweringError(f"quantized layer input {value.name!r} is not a constant of the graph; the exporter "
                             "must keep packed weights as initializers")


class _QuantLinearRule:
    """The pattern, check and replacement that lower one marker (``op`` is the rewriter's builder)."""

    def __init__(self, quant_format: str, accuracy_level: int) -> None:
        self.format, self.accuracy_level = quant_format, accuracy_level

    @staticmethod
    def target(op, x, qweight, scale, scheme, group_size, in_features, activations):  # noqa: ANN001, ANN205
        return op.QuantLinear(x, qweight, scale, scheme=scheme, group_size=group_size, in_features=in_features,
                              activations=activations, _domain=ONNX_DOMAIN, _outputs=["y"])

    def check(self, context, qweight: ir.Value, scale: ir.Value, scheme: ir.Attr, group_size: ir.Attr,  # noqa: ANN001
              activations: ir.Attr, **_: object) -> bool:
        """Refuse what the format cannot express (raises: a marker left in place runs nowhere)."""
        _constant(qweight)
        scales = _constant(scale)
        group = int(group_size.value)
        if activations.value in _DYNAMIC:
            if scales.dtype != np.float32:
                raise QuantLoweringError("w8a8 layers export in float32 only (onnxruntime's DynamicQuantizeLinear "
                                         "reads float32); convert the model with .float() before exporting")
        elif self.format == "matmulnbits" and activations.value == "none" and (
                scheme.value != "int4" or group < 16 or group & (group - 1)):
            raise QuantLoweringError(
                f"MatMulNBits runs int4 weights with a power-of-two group size >= 16; this layer is {scheme.value} "
                f"with group_size={group} (export it with quant_format='qdq', or quantize with group_size=32/128)")
        return True

    def replacement(self, op, x: ir.Value, qweight: ir.Value, scale: ir.Value, scheme: ir.Attr,  # noqa: ANN001
                    group_size: ir.Attr, in_features: ir.Attr, activations: ir.Attr, y: ir.Value) -> ir.Value:
        build = _Build(op, y.name)
        group, k, acts = int(group_size.value), int(in_features.value), activations.value
        packed = np.array(_constant(qweight))  # a copy: torch.from_numpy needs a writable array
        scales = _constant(scale)
        if self.format == "matmulnbits" and acts == "none":  # graphopt's nibbles are MatMulNBits' layout
            return build.matmulnbits(x, packed, scales, group, k, self.accuracy_level)
        codes = unpack(torch.from_numpy(packed), scheme.value, k).numpy()  # [out, in]
        if acts == "per_tensor":
            return build.dynamic(x, codes, scales[:, 0])
        if acts == "per_token":
            return build.per_token(x, codes, scales[:, 0])
        return build.qdq(x, codes, scales, scheme.value, group)


def _dequantize_packed(op, qweight, scale, scheme, group_size, width):  # noqa: ANN001, ANN201
    return op.DequantizePacked(qweight, scale, scheme=scheme, group_size=group_size, width=width,
                               _domain=ONNX_DOMAIN, _outputs=["y"])


def _dequantize_packed_check(context, qweight: ir.Value, scale: ir.Value, **_: object) -> bool:  # noqa: ANN001
    _constant(qweight)
    _constant(scale)
    return True


def _dequantize_packed_lowered(op, qweight: ir.Value, scale: ir.Value, scheme: ir.Attr, group_size: ir.Attr,  # noqa: ANN001
                               width: ir.Attr, y: ir.Value) -> ir.Value:
    """The ``[rows, width]`` weights as ``Cast(codes) * scales``, which onnxruntime folds at load."""
    codes = unpack(torch.from_numpy(np.array(_constant(qweight))), scheme.value, int(width.value)).numpy()
    return _Build(op, y.name).folded(codes, _constant(scale), scheme.value, int(group_size.value))


class _Build:
    """The operators for one marker whose output is named ``prefix``; new names start ``graphopt_q.``.

    Each layer gets its own constants and activation quantization: the shared passes merge equal ones.
    """

    def __init__(self, op, prefix: str | None) -> None:  # noqa: ANN001
        self.op, self.prefix = op, f"graphopt_q.{prefix}"

    def name(self, base: str) -> str:
        return f"{self.prefix}.{base}"

    def const(self, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        import onnx_ir as ir

        return self.op.initializer(ir.Tensor(np.asarray(array, order="C"), dtype=dtype), name=self.name(base))

    def node(self, op_type: str, *inputs: ir.Value, outputs: tuple[str, ...] | str, **attrs: object):  # noqa: ANN201
        names = [self.name(o) for o in ((outputs,) if isinstance(outputs, str) else outputs)]
        return getattr(self.op, op_type)(*inputs, _outputs=names, **attrs)

    def qdq(self, x: ir.Value, codes: np.ndarray, scale: np.ndarray, scheme: str, group: int) -> ir.Value:
        return self.op.MatMul(x, self.dequantized(codes.T, scale.T, scheme, group, axis=1))

    def folded(self, codes: np.ndarray, scale: np.ndarray, scheme: str, group: int) -> ir.Value:
        """``[rows, width]`` weights from 2-d ``codes`` and their ``[rows, groups]`` scales in ops a runtime
        folds into a constant: the codes (int8; int4 for int4 and ternary) zero-padded to whole groups, ``Cast``,
        ``Mul`` by the scales, ``Reshape`` (and ``Slice`` off the padding)."""
        import onnx_ir as ir

        rows, width = codes.shape
        groups = scale.shape[1]
        g = width if group <= 0 else group
        padded = np.zeros((rows, groups * g), dtype=np.int8)
        padded[:, :width] = codes
        w = self.const("w", padded.reshape(rows, groups, g), None if scheme == "int8" else ir.DataType.INT4)
        cast = self.node("Cast", w, outputs="w_cast", to=ir.DataType.from_numpy(scale.dtype))
        scaled = self.node("Mul", cast, self.const("scale", scale.reshape(rows, groups, 1)), outputs="w_scaled")
        flat = self.node("Reshape", scaled, self.const("shape", np.array([rows, groups * g], dtype=np.int64)),
                         outputs="w_flat" if groups * g == width else "w_padded")
        if groups * g == width:
            return flat
        return self.node("Slice", flat, self.const("start", np.array([0], dtype=np.int64)),
                         self.const("end", np.array([width], dtype=np.int64)),
                         self.const("axis", np.array([1], dtype=np.int64)), outputs="w_flat")

    def dequantized(self, codes: np.ndarray, scale: np.ndarray, scheme: str, group: int, axis: int) -> ir.Value:
        """``DequantizeLinear`` of 2-d ``codes`` whose rows (``axis=0``) or columns (``axis=1``) are the layer's
        output channels, ``scale`` laid out the same way (one group, or a group per block of ``group`` along
        the other axis). int4 and ternary codes are stored as ONNX int4 (two's complement, element 2i in the
        low nibble)."""
        import onnx_ir as ir

        w = self.const("w", codes.astype(np.int8), None if scheme == "int8" else ir.DataType.INT4)
        if group <= 0:
            per_channel = scale[:, 0] if axis == 0 else scale[0]
            return self.node("DequantizeLinear", w, self.const("scale", per_channel), outputs="w_float", axis=axis)
        return self.node("DequantizeLinear", w, self.const("scale", scale), outputs="w_float", axis=1 - axis,
                         block_size=group)

    def matmulnbits(self, x: ir.Value, packed: np.ndarray, scale: np.ndarray, group: int, k: int,
                    accuracy_level: int) -> ir.Value:
        n, blocks = scale.shape
        blob = np.full((n, blocks * group // 2), 0x88, dtype=np.uint8)  # padding columns: code 0 (stored 8)
        blob[:, :packed.shape[1]] = packed
        if k % 2:  # the last stored byte's high nibble is padding: make it code 0 too
            blob[:, packed.shape[1] - 1] = (blob[:, packed.shape[1] - 1] & 0x0F) | 0x80
        b = self.const("B", blob.reshape(n, blocks, group // 2))
        s = self.const("scales", scale.reshape(-1))
        return self.op.MatMulNBits(x, b, s, _domain="com.microsoft", K=k, N=n, bits=4, block_size=group,
                                   accuracy_level=accuracy_level)

    def dynamic(self, x: ir.Value, codes: np.ndarray, scale: np.ndarray) -> ir.Value:
        import onnx_ir as ir

        w = self.const("w", codes.T.astype(np.int8))
        wz = self.const("w_zero", np.zeros(codes.shape[0], dtype=np.int8))
        ws = self.const("w_scale", scale)
        xq, xs, xz = self.node("DynamicQuantizeLinear", x, outputs=("xq", "xs", "xz"))
        acc = self.node("MatMulInteger", xq, w, xz, wz, outputs="acc")
        accf = self.node("Cast", acc, outputs="accf", to=ir.DataType.FLOAT)
        s = self.node("Mul", xs, ws, outputs="s")
        return self.op.Mul(accf, s)

    def per_token(self, x: ir.Value, codes: np.ndarray, scale: np.ndarray) -> ir.Value:
        """Symmetric int8 codes per row (``max|x_row| / 127.5``, in [-128, 127]) in standard ops, then
        ``MatMulInteger``.

        One blocked ``QuantizeLinear`` (a block per row, opset 21) rounds half to even as torch does and
        writes the codes as uint8 ``c + 128`` with zero point 128 (exact: ``(u - 128) * w = c * w``), the
        operand type onnxruntime's fast x86 kernels take. int8 activations ran on a generic kernel
        (MiniLM: 3.6x the fp32 model's latency); Div/Round/Clip/Cast instead of QuantizeLinear cost three
        more passes over the activations. (An int32 ``DequantizeLinear`` in place of ``Cast -> Mul`` measured
        slower in onnxruntime.)
        """
        import onnx_ir as ir

        w = self.const("w", codes.T.astype(np.int8))
        ws = self.const("w_scale", scale)
        axes = self.const("axes", np.array([-1], dtype=np.int64))
        eps = self.const("eps", np.array(1e-8, dtype=np.float32))
        half = self.const("half_range", np.array(127.5, dtype=np.float32))
        # blocked QuantizeLinear, one block per row: round half to even, + 128, saturate to uint8
        absx = self.node("Abs", x, outputs="abs")
        mx = self.node("ReduceMax", absx, axes, outputs="max", keepdims=1)
        floor = self.node("Max", mx, eps, outputs="floor")
        xs = self.node("Div", floor, half, outputs="xs")
        shape = self.node("Shape", xs, outputs="shape")
        xz = self.node("ConstantOfShape", shape, outputs="xz", value=ir.tensor(np.array([128], dtype=np.uint8)))
        xq = self.node("QuantizeLinear", x, xs, xz, outputs="xq", axis=-1, block_size=codes.shape[1])
        # MatMulInteger takes the same 128 as a scalar (its per-row zero point would cost a broadcast)
        acc = self.node("MatMulInteger", xq, w, self.const("x_zero", np.array(128, dtype=np.uint8)), outputs="acc")
        accf = self.node("Cast", acc, outputs="accf", to=ir.DataType.FLOAT)
        s = self.node("Mul", accf, xs, outputs="s")
        return self.op.Mul(s, ws)
