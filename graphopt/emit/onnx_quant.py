"""Lower graphopt's quantized-linear markers in an exported ONNX graph to runnable operators.

The exporter writes each :class:`graphopt.nn.quant.QuantLinear` as one ``graphopt.quant::QuantLinear``
node over its packed codes and scales (``graphopt.kernels.quant``). :func:`lower_quantized` replaces
each with, by ``quant_format``:

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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from graphopt.kernels.quant import ONNX_DOMAIN, unpack

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


def has_quant_markers(model) -> bool:  # noqa: ANN001 - onnx.ModelProto
    return any(n.domain == ONNX_DOMAIN for n in model.graph.node)


def lower_quantized(model, quant_format: QuantFormat = "qdq", accuracy_level: int = 0  # noqa: ANN001
                    ) -> tuple[int, int]:
    """Replace every ``graphopt.quant::QuantLinear`` node of ``model`` (in place).

    Returns how many were lowered, and how many of those quantize their activations (w8a8).
    """
    import onnx

    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format={quant_format!r}: choose from {', '.join(QUANT_FORMATS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level}: onnxruntime accepts 0 (unset), 1 fp32, 2 fp16, "
                         "3 bf16 or 4 int8")
    if not has_quant_markers(model):
        return 0, 0
    graph = model.graph
    _merge_constant_muls(graph)
    lowering = _Lowering(graph, quant_format, accuracy_level)
    nodes = list(graph.node)
    del graph.node[:]
    count = dynamic = 0
    for node in nodes:
        if node.domain == ONNX_DOMAIN and node.op_type == "QuantLinear":
            graph.node.extend(lowering.lower(node))
            count += 1
            dynamic += any(a.name == "activations" and a.s in (b"per_tensor", b"per_token") for a in node.attribute)
        else:
            graph.node.append(node)
    lowering.drop_unused()
    _set_opset(model, "", QDQ_OPSET)
    if lowering.uses_msft:
        _set_opset(model, "com.microsoft", 1)
    for i in reversed(range(len(model.opset_import))):
        if model.opset_import[i].domain == ONNX_DOMAIN:
            del model.opset_import[i]
    onnx.checker.check_model(model)
    log.info("lowered %d quantized layers to %s", count, quant_format)
    return count, dynamic


def _merge_constant_muls(graph) -> None:  # noqa: ANN001
    """One ``Mul`` for equal ``Mul(x, constant)`` nodes: q, k and v scale their shared input by the same
    SmoothQuant factor, and then quantize it once (``DynamicQuantizeLinear`` is shared per input)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type == "Mul" and not node.domain and len(node.input) == 2:
            consts = [n for n in node.input if n in inits]
            if len(consts) == 1:
                other = next(n for n in node.input if n != consts[0])
                value = numpy_helper.to_array(inits[consts[0]])
                key = (other, value.dtype.str, value.shape, value.tobytes())
                if key in first and node.output[0] not in outputs:
                    rename[node.output[0]] = first[key]
                    continue
                first[key] = node.output[0]
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _set_opset(model, domain: str, version: int) -> None:  # noqa: ANN001
    for entry in model.opset_import:
        if entry.domain == domain:
            entry.version = max(entry.version, version)
            return
    model.opset_import.add(domain=domain, version=version)


class _Lowering:
    """Builds the replacement nodes and initializers for one graph."""

    def __init__(self, graph, quant_format: str, accuracy_level: int) -> None:  # noqa: ANN001
        self.graph, self.format, self.accuracy_level = graph, quant_format, accuracy_level
        self.inits = {t.name: t for t in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.uses_msft = False
        self._n = 0
        self._quantized_inputs: dict[str | tuple[str, str], tuple[str, str, str]] = {}

    # --- reading the marker -------------------------------------------------------------------------
    def _constant(self, name: str) -> np.ndarray:
        """The value behind ``name``: an initializer, possibly through Identity / Cast nodes."""
        from onnx import helper, numpy_helper

        if name in self.inits:  # read on demand: only the packed weights and scales are needed
            return numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is not None and node.op_type in ("Identity", "Cast"):
            value = self._constant(node.input[0])
            if node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                value = value.astype(helper.tensor_dtype_to_np_dtype(to))
            return value
        raise QuantLoweringError(f"quantized layer input {name!r} is not a constant of the graph; the exporter "
                                 "must keep packed weights as initializers")

    def _name(self, base: str) -> str:
        self._n += 1
        return f"graphopt_q{self._n}_{base}"

    def _add(self, base: str, array: np.ndarray, data_type: int | None = None, dims: list[int] | None = None,
             raw: bytes | None = None) -> str:
        from onnx import helper, numpy_helper

        name = self._name(base)
        if raw is None:
            tensor = numpy_helper.from_array(array, name)
        else:
            tensor = helper.make_tensor(name, data_type, dims, raw, raw=True)
        self.graph.initializer.append(tensor)
        return name

    # --- lowering -----------------------------------------------------------------------------------
    def lower(self, node) -> list:  # noqa: ANN001
        attrs = {a.name: (a.s.decode() if a.type == a.STRING else a.i) for a in node.attribute}
        scheme, group, k, acts = attrs["scheme"], int(attrs["group_size"]), int(attrs["in_features"]), \
            attrs["activations"]
        x, y = node.input[0], node.output[0]
        packed = np.array(self._constant(node.input[1]))
        scale = self._constant(node.input[2])
        if self.format == "matmulnbits" and acts == "none":  # weight-only: graphopt's nibbles are MatMulNBits' layout
            return self._matmulnbits(x, y, packed, scale, scheme, group, k)
        codes = unpack(torch.from_numpy(packed), scheme, k).numpy()  # [out, in]
        if acts == "per_tensor":
            return self._dynamic(x, y, codes, scale[:, 0])
        if acts == "per_token":
            return self._per_token(x, y, codes, scale[:, 0])
        return self._qdq(x, y, codes, scale, scheme, group)

    def _qdq(self, x: str, y: str, codes: np.ndarray, scale: np.ndarray, scheme: str, group: int) -> list:
        from onnx import TensorProto, helper

        wt = np.ascontiguousarray(codes.T)  # [in, out]
        if scheme == "int8":
            w = self._add("w", wt.astype(np.int8))
        else:  # ONNX int4: two's-complement nibbles, element 2i in the low nibble
            flat = wt.reshape(-1).astype(np.int16) & 0xF
            flat = np.pad(flat, (0, flat.size % 2))
            raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            w = self._add("w", wt, TensorProto.INT4, list(wt.shape), raw)
        if group <= 0:
            s = self._add("scale", np.ascontiguousarray(scale[:, 0]))
            dq = helper.make_node("DequantizeLinear", [w, s], [self._name("w_float")], axis=1)
        else:
            s = self._add("scale", np.ascontiguousarray(scale.T))  # [groups, out]
            dq = helper.make_node("DequantizeLinear", [w, s], [self._name("w_float")], axis=0, block_size=group)
        return [dq, helper.make_node("MatMul", [x, dq.output[0]], [y])]

    def _matmulnbits(self, x: str, y: str, packed: np.ndarray, scale: np.ndarray, scheme: str, group: int,
                     k: int) -> list:
        from onnx import helper

        if scheme != "int4" or group < 16 or group & (group - 1):
            raise QuantLoweringError(
                f"MatMulNBits runs int4 weights with a power-of-two group size >= 16; this layer is {scheme} "
                f"with group_size={group} (export it with quant_format='qdq', or quantize with group_size=32/128)")
        n, blocks = scale.shape
        blob = np.zeros((n, blocks * group // 2), dtype=np.uint8)
        blob[:] = 0x88  # padding columns: code 0 (stored 8) in both nibbles
        blob[:, :packed.shape[1]] = packed
        if k % 2:  # the last stored byte's high nibble is padding: make it code 0 too
            blob[:, packed.shape[1] - 1] = (blob[:, packed.shape[1] - 1] & 0x0F) | 0x80
        b = self._add("B", blob.reshape(n, blocks, group // 2))
        s = self._add("scales", np.ascontiguousarray(scale.reshape(-1)))
        self.uses_msft = True
        return [helper.make_node("MatMulNBits", [x, b, s], [y], domain="com.microsoft", K=k, N=n, bits=4,
                                 block_size=group, accuracy_level=self.accuracy_level)]

    def _dynamic(self, x: str, y: str, codes: np.ndarray, scale: np.ndarray) -> list:
        from onnx import TensorProto, helper

        if scale.dtype != np.float32:
            raise QuantLoweringError("w8a8 layers export in float32 only (onnxruntime's DynamicQuantizeLinear "
                                     "reads float32); convert the model with .float() before exporting")
        w = self._add("w", np.ascontiguousarray(codes.T.astype(np.int8)))
        wz = self._add("w_zero", np.zeros(codes.shape[0], dtype=np.int8))
        ws = self._add("w_scale", np.ascontiguousarray(scale))
        acc, accf, s = (self._name(t) for t in ("acc", "accf", "s"))
        nodes = []
        if x not in self._quantized_inputs:  # layers reading the same tensor share its quantization
            self._quantized_inputs[x] = (self._name("xq"), self._name("xs"), self._name("xz"))
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(self._quantized_inputs[x])))
        xq, xs, xz = self._quantized_inputs[x]
        nodes += [helper.make_node("MatMulInteger", [xq, w, xz, wz], [acc]),
                 helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT),
                 helper.make_node("Mul", [xs, ws], [s]),
                 helper.make_node("Mul", [accf, s], [y])]
        return nodes

    def _per_token(self, x: str, y: str, codes: np.ndarray, scale: np.ndarray) -> list:
        """Symmetric int8 codes per row (``max|x_row| / 127.5``, in [-128, 127]) in standard ops, then
        ``MatMulInteger``.

        One blocked ``QuantizeLinear`` (a block per row, opset 21) rounds half to even as torch does and
        writes the codes as uint8 ``c + 128`` with zero point 128 (exact: ``(u - 128) * w = c * w``), the
        operand type onnxruntime's fast x86 kernels take. int8 activations ran on a generic kernel
        (MiniLM: 3.6x the fp32 model's latency); Div/Round/Clip/Cast instead of QuantizeLinear cost three
        more passes over the activations. (An int32 ``DequantizeLinear`` in place of ``Cast -> Mul`` measured
        slower in onnxruntime.)
        """
        from onnx import TensorProto, helper, numpy_helper

        if scale.dtype != np.float32:
            raise QuantLoweringError("w8a8 layers export in float32 only; convert the model with .float() first")
        w = self._add("w", np.ascontiguousarray(codes.T.astype(np.int8)))
        ws = self._add("w_scale", np.ascontiguousarray(scale))
        nodes = []
        if (x, "token") not in self._quantized_inputs:
            names = [self._name(t) for t in ("abs", "max", "floor", "xs", "shape", "xz", "xq")]
            axes, eps, half = (self._add("axes", np.array([-1], dtype=np.int64)),
                               self._add("eps", np.array(1e-8, dtype=np.float32)),
                               self._add("half_range", np.array(127.5, dtype=np.float32)))
            absx, mx, floor, xs, shape, xz, xq = names
            # blocked QuantizeLinear, one block per row: round half to even, + 128, saturate to uint8
            nodes += [helper.make_node("Abs", [x], [absx]),
                      helper.make_node("ReduceMax", [absx, axes], [mx], keepdims=1),
                      helper.make_node("Max", [mx, eps], [floor]),
                      helper.make_node("Div", [floor, half], [xs]),
                      helper.make_node("Shape", [xs], [shape]),
                      helper.make_node("ConstantOfShape", [shape], [xz],
                                       value=numpy_helper.from_array(np.array([128], dtype=np.uint8))),
                      helper.make_node("QuantizeLinear", [x, xs, xz], [xq], axis=-1, block_size=codes.shape[1])]
            # MatMulInteger takes the same 128 as a scalar (its per-row zero point would cost a broadcast)
            self._quantized_inputs[(x, "token")] = (xq, xs, self._add("x_zero", np.array(128, dtype=np.uint8)))
        xq, xs, xz = self._quantized_inputs[(x, "token")]
        acc, accf, s = (self._name(t) for t in ("acc", "accf", "s"))
        return nodes + [helper.make_node("MatMulInteger", [xq, w, xz], [acc]),
                        helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT),
                        helper.make_node("Mul", [accf, xs], [s]),
                        helper.make_node("Mul", [s, ws], [y])]

    def drop_unused(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def lower_file(path: str | Path, quant_format: QuantFormat = "qdq", accuracy_level: int = 0) -> tuple[int, int]:
    """:func:`lower_quantized` on a saved file, rewritten in place (external data kept external)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not has_quant_markers(model):
        return 0, 0
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    counts = lower_quantized(model, quant_format, accuracy_level)
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data")
    return counts
