"""Verification of a written ONNX file: ``onnx.checker``, then onnxruntime against torch's outputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import ExampleInputs
from .onnx_inputs import CallLayout, call_layout, describe_inputs, grown_case
from .onnx_report import OnnxExportError, OnnxVerificationError, VerifiedRun, first_lines

log = logging.getLogger(__name__)


def file_info(path: Path) -> tuple[int, int, bool, dict, dict]:
    """``(opset, size in bytes incl. external data, uses external data, inputs, outputs)`` of a saved file."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    locations = {e.value for t in proto.graph.initializer if uses_external_data(t)
                 for e in t.external_data if e.key == "location"}
    size = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).exists())

    def shapes(values: Any) -> dict[str, tuple[int | str, ...]]:
        return {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
                for v in values}

    return opset, size, bool(locations), shapes(proto.graph.input), shapes(proto.graph.output)


def check_dynamic_dims(path: Path, shapes: dict[str, tuple[int | str, ...]],
                        axes: dict[str, dict[int, str]]) -> None:
    """Refuse a file whose inputs kept a fixed size on an axis the caller marked dynamic."""
    fixed = [f"{dim!r} (axis {axis} of {name!r}) has the fixed size {shapes[name][axis]}"
             for name, spec in axes.items() if name in shapes for axis, dim in spec.items()
             if isinstance(shapes[name][axis], int)]
    if fixed:
        raise refuse_file(path, "the exported graph is specialised to the example shape: dynamic axis "
                          + "; ".join(fixed) + ". The model's code fixes that size (e.g. a branch or "
                          "reshape on it): make the code shape-generic, or drop the axis from dynamic_axes")


def _session(path: Path, config: dict[str, str] | None = None, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:  # timing: this many threads for one op, one op at a time
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, names: list[str], tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The session's inputs by name, as numpy arrays; a missing or bfloat16 input is refused, said why."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise OnnxExportError(f"the ONNX graph expects inputs {missing} that the model call does not have "
                              f"(tensor inputs: {names})")
    feed = {}
    for name, t in zip(names, tensors):
        if name in wanted:
            if t.dtype == torch.bfloat16:
                raise OnnxExportError(f"input {name!r} is bfloat16, which cannot be fed to onnxruntime from "
                                      "numpy; verify with float32/float16 example inputs, or check=False")
            feed[name] = t.detach().cpu().contiguous().numpy()
    return feed


def _run_ort(session: Any, names: list[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(o) for o in session.run(None, _feed(session, names, tensors))]


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
             rel_l2: float | None = None) -> tuple[float, str]:
    """``(max abs error, problem)``; ``problem`` is empty when ``got`` matches ``ref`` within tolerance.

    With ``rel_l2``, a float output passes when ``||got - ref|| <= rel_l2 * ||ref||`` instead of elementwise.
    """
    ref = ref.detach().cpu()
    if tuple(got.shape) != tuple(ref.shape):
        return float("inf"), (f"output {name!r} has shape {list(got.shape)} in onnxruntime, "
                              f"{list(ref.shape)} in torch")
    if got.numel() == 0:
        return 0.0, ""
    if not (ref.is_floating_point() or ref.is_complex()):
        bad = int((got.to(ref.dtype) != ref).sum())
        return float(bad), (f"output {name!r}: {bad} of {ref.numel()} values differ (exact match required "
                            f"for {str(ref.dtype).removeprefix('torch.')})" if bad else "")
    g, r = got.double(), ref.double()
    close = torch.isclose(g, r, rtol=rtol, atol=atol, equal_nan=True)
    diff = (g - r).abs().nan_to_num(nan=float("inf"))
    max_abs = float(diff.max())
    if rel_l2 is not None:
        rel = float(diff.norm() / r.norm().clamp_min(1e-12))
        return max_abs, ("" if rel <= rel_l2 else f"output {name!r}: relative error {rel:.3g} > {rel_l2:g} "
                         f"(max abs error {max_abs:.3g})")
    if bool(close.all()):
        return max_abs, ""
    excess = torch.where(close, torch.zeros_like(diff), diff - rtol * r.abs())
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    n_bad = int((~close).sum())
    return max_abs, (f"output {name!r}: {n_bad} of {ref.numel()} values outside atol={atol:g} + "
                     f"rtol={rtol:g}*|torch|; max abs error {max_abs:.3g}; worst at index {list(worst)}: "
                     f"onnxruntime {float(g[worst]):.6g} vs torch {float(r[worst]):.6g}")


def refuse_file(path: Path, message: str) -> OnnxVerificationError:
    """Move the unverified file out of the way and build the error."""
    failed = path.with_name(path.name + ".failed")
    if path.exists():
        os.replace(path, failed)
        where = f"the file was moved to {failed} for inspection; nothing is left at {path}"
    else:
        failed, where = None, "no file was written"
    log.error("ONNX export of %s refused: %s", path.name, message.splitlines()[0])
    return OnnxVerificationError(f"{message}\n  {where}", failed)


def verify_file(path: Path, model: nn.Module, layout: CallLayout, out_names: list[str],
            reference: list[torch.Tensor], axes: dict[str, dict[int, str]], atol: float,
            rtol: float, session_config: dict[str, str] | None = None, rel_l2: float | None = None
            ) -> tuple[list[VerifiedRun], list[str]]:
    """Check ``path`` with ``onnx.checker`` and compare onnxruntime (``session_config`` entries set) to torch
    (elementwise, or by relative error ``rel_l2`` when given)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise refuse_file(path, f"onnx.checker rejected the exported model: {first_lines(e)}") from e
    try:
        session = _session(path, session_config)
    except Exception as e:
        raise refuse_file(path, f"onnxruntime cannot load the exported model: {first_lines(e)}") from e
    runs: list[VerifiedRun] = []
    notes: list[str] = []
    cases = [(layout.tensors, reference)]
    if axes:
        grown = grown_case(model, layout, axes, notes)
        cases += [grown] if grown is not None else []
    for tensors, ref in cases:
        described = describe_inputs(layout.names, tensors)
        try:
            got = _run_ort(session, layout.names, tensors)
        except OnnxExportError as e:
            raise refuse_file(path, str(e)) from e
        except Exception as e:
            grown = tensors is not layout.tensors
            hint = "; the graph is probably specialised to the example shape" if grown else ""
            raise refuse_file(path, f"onnxruntime failed on {described}{hint}: {first_lines(e)}") from e
        if len(got) != len(ref):
            raise refuse_file(path, f"onnxruntime returned {len(got)} outputs, torch {len(ref)} (on {described})")
        worst, problems = 0.0, []
        for name, g, r in zip(out_names, got, ref):
            err, problem = _compare(name, g, r, atol, rtol, rel_l2)
            worst = max(worst, err)
            if problem:
                problems.append(problem)
        if problems:
            raise refuse_file(path, f"onnxruntime disagrees with torch on {described}:\n  " + "\n  ".join(problems))
        runs.append(VerifiedRun(described, worst))
        log.info("onnxruntime matches torch on %s (max abs error %.2e)", described, worst)
    return runs, notes


def ort_runner(path: str | Path, model: nn.Module, inputs: ExampleInputs, threads: int) -> Callable[[], None]:
    """One call of the ONNX file at ``path`` in onnxruntime on ``inputs`` (laid out as ``model``'s call, as
    export_onnx named them), with ``threads`` intra-op threads: what timing on that runtime runs."""
    session = _session(Path(path), threads=threads)
    layout = call_layout(model, inputs)
    feed = _feed(session, layout.names, layout.tensors)  # converted once: the timed call is the session's alone

    def run() -> None:
        session.run(None, feed)

    return run


def default_session_error(path: Path, layout: CallLayout, reference: list[torch.Tensor]) -> float:
    """The largest absolute difference to torch of ``path`` run as users run a file: a plain
    ``onnxruntime.InferenceSession`` with no session option (the file is left where it is)."""
    got = _run_ort(_session(path), layout.names, layout.tensors)
    return max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, reference))
