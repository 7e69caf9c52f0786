"""Verified ONNX emission: ``torch.onnx.export(dynamo=True)``, ``onnx.checker``, then onnxruntime vs torch.

:func:`export_onnx` writes the file and reports success only after onnxruntime reproduced the torch
outputs within tolerance on the example inputs and, when axes are marked dynamic, on inputs with
other sizes on those axes (a graph specialised to the example shape is caught there). On a mismatch
it raises :class:`OnnxVerificationError` and renames the file to ``<name>.failed``, so no
valid-looking file is left at the requested path.

Dynamic axes are named per input (``{"input_ids": {0: "batch", 1: "seq"}}``) and become shared
``torch.export.Dim`` objects; inputs passed through ``*args``/``**kwargs`` or containers are exported
through a flat wrapper (initializer names then start with ``model.``). An axis the model's code
fixes anyway (the file's input keeps a number there) is refused.

Custom ops of ``graphopt.kernels`` are exported through the ``ONNX_TRANSLATIONS`` table of each
imported kernel module. The caller's model is not changed: it is exported in eval mode, and its
training flags, hooks and attributes are restored afterwards.
"""


from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..frontend.inputs import ExampleInputs, InputError, as_example_inputs, flatten_outputs, missing_inputs
from ..frontend.kv_cache import caches_off
from ..frontend.preserve import preserved
from .onnx_inputs import CallLayout, DynamicAxes, FlatCall, call_layout, dynamic_shapes, normalise_axes
from .onnx_quant import (
    QUANT_FORMATS,
    W8A8_REL_L2,
    QuantFormat,
    QuantLoweringError,
    lower_quantized,
    lowering_note,
    qdq_session_config,
)
from .onnx_report import ExportReport, OnnxExportError, OnnxVerificationError, VerifiedRun, first_lines
from .onnx_rewrites import rewrite_for_onnxruntime
from .onnx_verify import check_dynamic_dims, default_session_error, file_info, refuse_file, verify_file

log = logging.getLogger(__name__)

#: the opset written unless the caller picks one: the newest that torch's exporter and onnxruntime's CPU
#: kernels both support. From 23 on ``scaled_dot_product_attention`` is one ``Attention`` node instead of
#: ~25 shape, transpose, matmul and softmax nodes (MiniLM w8a8 in onnxruntime: 0.96x the latency at
#: batch 1 x 32 tokens, 0.93x at 32 x 64; benchmarks/quant.py).
DEFAULT_OPSET = 23

_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                   "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir")


# --- exporter plumbing ----------------------------------------------------------------------------

@contextlib.contextmanager
def _no_opset23_fusions() -> Iterator[None]:
    """Keep the exporter's optimizer from fusing into opset-23 RotaryEmbedding / RMSNormalization / GQA.

    With onnxscript 0.7 the RotaryEmbedding rule turns HF Llama's rotary code into a node onnxruntime
    1.32 rejects ("cos_cache and sin_cache are expected to have the same shape as input x"); the rules
    are pattern rewrites of what the graph already computes, so leaving them out changes no result.
    ``Attention`` itself comes from the translation of ``scaled_dot_product_attention``, not from them.
    """
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:  # another onnxscript layout: nothing to turn off
        yield
        return
    fuse = onnx_fusions.fuse
    onnx_fusions.fuse = lambda model, **kwargs: {}
    try:
        yield
    finally:
        onnx_fusions.fuse = fuse


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's prints, logs and warnings (re-logged at DEBUG); errors still raise."""
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    printed = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed), \
                contextlib.redirect_stderr(printed):  # torch.export dumps partial graphs there on failure
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for w in caught:
            log.debug("exporter warning: %s", w.message)
        if printed.getvalue().strip():
            log.debug("exporter output:\n%s", printed.getvalue().rstrip())


def _translations(extra: Mapping[Callable, Callable] | None) -> dict[Callable, Callable]:
    """ONNX translations of graphopt's custom ops (from every imported ``graphopt.kernels`` module)."""
    table: dict[Callable, Callable] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("graphopt.kernels.") and module is not None:
            table.update(getattr(module, "ONNX_TRANSLATIONS", {}) or {})
    table.update(extra or {})
    return table


def _output_names(output: Any, input_names: Sequence[str]) -> tuple[list[torch.Tensor], list[str] | None]:
    """The output tensors in the exporter's order and readable names (``None`` if they cannot be matched).

    Names come from :func:`flatten_outputs`: ``last_hidden_state`` for HF outputs, ``output_0``,
    ``output_1.gate`` for tuples and dicts; a name that an input already has gets an ``output.`` prefix.
    """
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
    flat = flatten_outputs(output)
    if len(flat) != len(leaves) or any(a is not b for a, b in zip(flat.values(), leaves)):
        return leaves, None
    names = [re.sub(r"\[(\d+)\]", r"_\1", key.removeprefix("output.")) for key in flat]
    names = [f"output.{n}" if n in input_names else n for n in names]
    return leaves, names if len(set(names)) == len(names) else None


def _export_error(exc: BaseException, model: nn.Module, inputs: ExampleInputs,
                  dynamic: bool) -> OnnxExportError:
    """A clear error for a failed ``torch.onnx.export``: which step failed, where, and what to try."""
    head = f"ONNX export of {type(model).__name__} on {inputs.describe()} failed"
    if type(exc).__name__ == "TorchExportError":  # step 1: torch.export; graphopt's capture diagnosis applies
        from ..frontend.errors import diagnose, exception_chain

        text = "\n".join(str(e) for e in exception_chain(exc))
        if dynamic and ("Constraints violated" in text or "specializ" in text or "specialis" in text):
            return OnnxExportError(f"{head}: the model fixes the size of a dynamic axis.\n"
                                   f"    {first_lines(exc, 12)}\n  try: drop that axis from dynamic_axes, "
                                   "or follow torch's suggested Dim range")
        return OnnxExportError(f"{head} in torch.export (step 1 of 3):\n{diagnose(exc, model, inputs)}")
    return OnnxExportError(f"{head} while translating to ONNX:\n    {first_lines(exc)}\n"
                           "  try: an op without an ONNX translation needs custom_translations={op overload: "
                           "onnxscript function}; or pass opset=<newer opset>")


def _reference_run(model: nn.Module, inputs: ExampleInputs) -> Any:
    """The model's outputs on the example inputs; inputs it cannot run on get an error that says so."""
    try:
        with torch.no_grad():
            return inputs.call(model)
    except Exception as e:  # the inputs do not fit the model: say that, not the op that noticed
        missing = missing_inputs(model, inputs)
        hint = f"; forward() also takes {', '.join(missing)}" if missing else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"export_onnx: the model does not run on these example inputs ({inputs.describe()}): "
                         f"{type(e).__name__}: {first}{hint}") from e


def _check_materialised(model: nn.Module, layout: CallLayout) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} has {len(meta)} parameters/buffers on the meta device "
                         f"(e.g. {meta[0]!r}); ONNX needs real weights. Materialise them first, e.g. "
                         "model.to_empty(device='cpu') then load_state_dict(...), or from_pretrained(...)")
    meta_inputs = [n for n, t in zip(layout.names, layout.tensors) if t.is_meta]
    if meta_inputs:
        raise ValueError(f"example inputs {meta_inputs} are on the meta device; pass real tensors")


# --- the entry point ------------------------------------------------------------------------------

#: how a user sets the session option graphopt verifies QDQ files under
QDQ_SESSION_HINT = ("SessionOptions().add_session_config_entry('session.qdq_matmulnbits_accuracy_level', "
                    "'{level}')")


def _check_options(opset: int | None, quant_format: str, accuracy_level: int) -> None:
    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"export_onnx(quant_format={quant_format!r}): choose from {', '.join(QUANT_FORMATS)}")
    if accuracy_level not in (0, 1, 2, 3, 4) or isinstance(accuracy_level, bool):
        raise ValueError(f"export_onnx(accuracy_level={accuracy_level!r}): MatMulNBits takes 0 (float, the default), "
                         "1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations, faster)")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"export_onnx(opset={opset!r}): give an ONNX opset version, an int (default {DEFAULT_OPSET}; "
                         "below 18 torch's exporter converts its opset-18 graph down)")


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_axes: DynamicAxes | None = None, opset: int | None = None, atol: float = 1e-4,
                rtol: float = 1e-3, check: bool = True, external_data: bool | None = None,
                custom_translations: Mapping[Callable, Callable] | None = None, quant_format: QuantFormat = "qdq",
                accuracy_level: int = 0, ort_rewrites: bool = True) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and verify the file in onnxruntime against torch.

    Args:
        model: the model; exported in eval mode, left unchanged (training flags restored).
        example_inputs: a tensor, a tuple of positional args, a dict of keyword args, or ExampleInputs.
        path: the ``.onnx`` file to write (parent folders are created).
        dynamic_axes: ``{input name: {axis: dim name}}``, e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``
            (axes that share a name share a size), or ``"auto"``: axis 0 of every input is ``batch`` and
            axis 1 of 2-D integer inputs (token ids, masks) is ``seq``. Dynamic axes are re-verified
            with other sizes (``batch+1``, ``seq+3``).
        opset: ONNX opset version (default :data:`DEFAULT_OPSET`, 23: attention exports as one ``Attention``
            node, which onnxruntime runs fused; give 18 for runtimes without opset 23).
        atol, rtol: an output value passes when ``|ort - torch| <= atol + rtol * |torch|``.
        check: run ``onnx.checker`` and the onnxruntime comparison (strongly recommended).
        external_data: store weights in ``<path>.data``; ``None`` does so only above 2 GB.
        custom_translations: extra ``{op overload: onnxscript function}`` for custom ops.
        quant_format: how quantized layers are written (:mod:`graphopt.emit.onnx_quant`): ``"qdq"``
            (standard ``DequantizeLinear -> MatMul``, opset 21) or ``"matmulnbits"`` (onnxruntime's 4-bit op).
        accuracy_level: ``MatMulNBits``' compute precision: 0 (float, the default) or 4 (int8, faster).
        ort_rewrites: apply :mod:`graphopt.emit.onnx_rewrites`' exact rewrites for onnxruntime's CPU provider
            (residual LayerNorms on 2-D views, which it runs unfused, 5-6x faster than its
            ``SkipLayerNormalization``; attention on the hidden layout, without per-head transposes); False
            writes the graph as traced (e.g. for a runtime whose fused kernels are the faster ones).

    Returns:
        An :class:`ExportReport` (path, opset, size, input/output shapes, errors); ``os.fspath`` works on it.

    Raises:
        OnnxVerificationError: the checker or onnxruntime disagreed; the file is renamed ``<path>.failed``.
        OnnxExportError: torch.onnx.export failed. ValueError/TypeError/InputError: bad arguments.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    _check_options(opset, quant_format, accuracy_level)  # before the slow export: a typo costs nothing
    inputs = as_example_inputs(example_inputs)
    layout = call_layout(model, inputs)
    _check_materialised(model, layout)
    axes = normalise_axes(dynamic_axes, layout)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"export_onnx: {path} is a directory; give the path of the .onnx file to write "
                         f"(e.g. {path / 'model.onnx'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = DEFAULT_OPSET if opset is None else opset
    start = time.perf_counter()

    if model.training:
        log.info("exporting %s in eval mode (its training mode is restored afterwards)", type(model).__name__)
    with preserved(model), caches_off(model):  # graphopt's runs and the exported graph: no KV cache
        output = _reference_run(model, inputs)
        reference, names = _output_names(output, layout.names)
        flat = bool(axes) and not layout.simple
        target: nn.Module = FlatCall(model, layout) if flat else model
        if flat:
            args, kwargs = tuple(layout.tensors), {}
        else:
            bound = layout.bind(layout.tensors)
            args, kwargs = tuple(bound.args), dict(bound.kwargs)
        log.info("exporting %s to %s (dynamic axes: %s)", type(model).__name__, path, axes or "none")
        try:
            with _quiet_exporter(), _no_opset23_fusions():
                program = torch.onnx.export(
                    target, args, kwargs=kwargs, dynamo=True, verbose=False, opset_version=opset,
                    input_names=layout.names, output_names=names,
                    dynamic_shapes=dynamic_shapes(axes, layout, flat),
                    custom_translation_table=_translations(custom_translations) or None)
        except Exception as e:
            raise _export_error(e, model, inputs, bool(axes)) from e
        try:  # quantized layers are lowered on the in-memory graph: the file is written once, lowered
            with _quiet_exporter():
                lowered, dynamic = lower_quantized(program.model, quant_format, accuracy_level)
                rewritten = rewrite_for_onnxruntime(program.model) if ort_rewrites else {}
        except QuantLoweringError:
            path.unlink(missing_ok=True)  # a refusal leaves nothing at the path, not an earlier export either
            raise
        try:
            with _quiet_exporter():
                program.save(path, external_data=external_data)
        except Exception as e:
            raise _export_error(e, model, inputs, bool(axes)) from e
        del program
        info = file_info(path)
        check_dynamic_dims(path, info[3], axes)
        out_names = names or [f"output_{i}" for i in range(len(reference))]
        runs: list[VerifiedRun] = []
        notes: list[str] = []
        plain: float | None = None
        config = qdq_session_config(accuracy_level) if lowered > dynamic and quant_format == "qdq" else None
        int8_compute = lowered > dynamic and accuracy_level == 4  # onnxruntime rounds activations to int8 too
        rel_l2 = W8A8_REL_L2 if dynamic or int8_compute else None
        if lowered:
            notes.append(lowering_note(lowered, dynamic, quant_format, accuracy_level))
        if rewritten:
            notes.append("rewritten for onnxruntime's CPU provider (same arithmetic, faster kernels): "
                         + ", ".join(f"{n} {what}" for what, n in rewritten.items()))
        if dynamic or int8_compute:
            what = f"{dynamic} w8a8 layers" if dynamic else "layers at accuracy_level=4"
            notes.append(f"{what} round their inputs to int8 at run time, where float differences between "
                         "runtimes flip a few codes: compared by relative error <= "
                         f"{W8A8_REL_L2:g} instead of elementwise")
        if info[0] != opset:
            notes.append(f"written at opset {info[0]}, not the {opset} asked for: quantized layers written as "
                         f"{quant_format} need it")
        if check:
            try:
                runs, checked = verify_file(path, model, layout, out_names, reference, axes, atol, rtol, config,
                                            rel_l2)
            except OnnxVerificationError:
                raise
            except BaseException as e:  # a crash is no verification: leave no unverified file at the path
                raise refuse_file(path, f"verification in onnxruntime crashed: {type(e).__name__}: "
                                        f"{first_lines(e)}") from e
            notes += checked
            if config is not None:  # what a plain InferenceSession computes, which users run
                plain = default_session_error(path, layout, reference)
                notes.append(
                    f"a plain onnxruntime.InferenceSession fuses the QDQ layers into MatMulNBits at accuracy level "
                    f"4 (int8 activations): max abs error {plain:.3g} vs torch, against {runs[0].max_abs_error:.3g} "
                    f"verified with {QDQ_SESSION_HINT.format(level=accuracy_level)}; or export with "
                    "quant_format='matmulnbits', whose accuracy level is written in the file")
        else:
            log.warning("ONNX file %s written without verification (check=False)", path)
    opset_used, size, external, in_shapes, out_shapes = info
    report = ExportReport(path, opset_used, size, in_shapes, out_shapes, axes, tuple(runs), external,
                          time.perf_counter() - start, tuple(notes), plain)
    log.info("%s", report)
    return report


__all__ = ["ExportReport", "OnnxExportError", "OnnxVerificationError", "VerifiedRun", "export_onnx"]
