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
import inspect
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .inputs import ExampleInputs, InputError, as_example_inputs, flatten_outputs

log = logging.getLogger(__name__)

#: ``{input name: {axis: dim name}}`` (a list of axes names them ``<input>_dim<axis>``), or ``"auto"``.
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]] | str

_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                   "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir")


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX (the message says which step failed and what to try)."""


class OnnxVerificationError(OnnxExportError):
    """The exported file failed ``onnx.checker`` or disagreed with torch in onnxruntime.

    ``failed_path`` is where the file was moved (``<path>.failed``), or ``None`` if nothing was written.
    """

    def __init__(self, message: str, failed_path: Path | None = None) -> None:
        super().__init__(message)
        self.failed_path = failed_path


@dataclass(frozen=True)
class VerifiedRun:
    """One onnxruntime run compared with torch: the inputs used and the largest absolute error."""

    inputs: str
    max_abs_error: float


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it was verified; usable as a path (``os.fspath``)."""

    path: Path
    opset: int
    size_bytes: int
    inputs: dict[str, tuple[int | str, ...]]
    outputs: dict[str, tuple[int | str, ...]]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    runs: tuple[VerifiedRun, ...] = ()
    external_data: bool = False
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return bool(self.runs)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.runs), default=float("nan"))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        def sig(items: dict[str, tuple[int | str, ...]]) -> str:
            return ", ".join(f"{k}[{', '.join(map(str, v))}]" for k, v in items.items())

        lines = [f"wrote {self.path} (opset {self.opset}, {_human_size(self.size_bytes)}"
                 + (", external data" if self.external_data else "") + f", {self.seconds:.1f}s)",
                 f"  inputs:  {sig(self.inputs)}", f"  outputs: {sig(self.outputs)}"]
        lines += [f"  onnxruntime == torch on {r.inputs}: max abs error {r.max_abs_error:.2e}"
                  for r in self.runs]
        if not self.runs:
            lines.append("  NOT verified in onnxruntime (check=False)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --- inputs: names, layout, rebuilding a call from flat tensors --------------------------------------

def _key_suffix(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("idx", "key", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "".join(f"_{p}" for p in parts)


@dataclass
class _Layout:
    """The example call as named tensor leaves of ``forward``'s bound arguments (signature order)."""

    signature: inspect.Signature
    arguments: dict[str, tuple[list[Any], Any]]  # bound name -> (leaves, treespec)
    slots: list[tuple[str, int]]  # one per tensor input: (bound name, leaf index)
    names: list[str]
    tensors: list[torch.Tensor]
    simple: bool  # no *args/**kwargs and every tensor is a whole named argument (no nesting)

    def bind(self, tensors: Sequence[torch.Tensor]) -> inspect.BoundArguments:
        leaves = {name: list(lv) for name, (lv, _) in self.arguments.items()}
        for (name, i), t in zip(self.slots, tensors):
            leaves[name][i] = t
        values = {n: pytree.tree_unflatten(leaves[n], spec) for n, (_, spec) in self.arguments.items()}
        return inspect.BoundArguments(self.signature, values)  # type: ignore[arg-type]

    def call_inputs(self, tensors: Sequence[torch.Tensor]) -> ExampleInputs:
        bound = self.bind(tensors)
        return ExampleInputs(tuple(bound.args), dict(bound.kwargs))


def _layout(model: nn.Module, inputs: ExampleInputs) -> _Layout:
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as e:
        raise InputError(f"the example inputs ({inputs.describe()}) do not fit "
                         f"{type(model).__name__}.forward{signature}: {e}") from None
    arguments, slots, names, tensors, simple = {}, [], [], [], True
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        simple = simple and kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        with_path, spec = pytree.tree_flatten_with_path(value)
        arguments[name] = ([leaf for _, leaf in with_path], spec)
        for i, (path, leaf) in enumerate(with_path):
            if not isinstance(leaf, torch.Tensor):
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:  # **kwargs: the key is the input's name
                label = str(getattr(path[0], "key", name)) + _key_suffix(path[1:])
            else:
                label = name + _key_suffix(path)
            simple = simple and not path
            slots.append((name, i))
            names.append(label)
            tensors.append(leaf)
    if len(set(names)) != len(names):
        raise InputError(f"two example inputs would get the same ONNX input name: {names}")
    return _Layout(signature, arguments, slots, names, tensors, simple)


class _FlatCall(nn.Module):
    """Exports ``model`` as ``forward(*tensors)``: the original call is rebuilt from flat tensors.

    Used when inputs go through ``*args``/``**kwargs`` or containers, which torch.export cannot mark
    dynamic directly.
    """

    def __init__(self, model: nn.Module, layout: _Layout) -> None:
        super().__init__()
        self.model = model
        self._layout = layout

    def forward(self, *tensors: torch.Tensor) -> Any:
        bound = self._layout.bind(tensors)
        return self.model(*bound.args, **bound.kwargs)


# --- dynamic axes ---------------------------------------------------------------------------------

def _auto_axes(layout: _Layout) -> dict[str, dict[int, str]]:
    """Axis 0 of every tensor input is ``batch``; axis 1 of 2-D integer inputs (ids, masks) is ``seq``."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(layout.names, layout.tensors):
        spec: dict[int, str] = {}
        if t.dim() >= 1 and t.shape[0] >= 2:
            spec[0] = "batch"
        if t.dim() == 2 and not t.is_floating_point() and not t.is_complex() and t.shape[1] >= 2:
            spec[1] = "seq"
        if spec:
            axes[name] = spec
    skipped = [n for n, t in zip(layout.names, layout.tensors) if t.dim() >= 1 and t.shape[0] < 2]
    if skipped:
        log.warning("dynamic_axes='auto': batch axis of %s left static (size < 2 in the example inputs)",
                    skipped)
    return axes


def _normalise_axes(dynamic_axes: DynamicAxes | None, layout: _Layout) -> dict[str, dict[int, str]]:
    if dynamic_axes is None:
        return {}
    if isinstance(dynamic_axes, str):
        if dynamic_axes != "auto":
            raise ValueError(f"dynamic_axes must be a dict {{input name: {{axis: name}}}} or 'auto', "
                             f"got {dynamic_axes!r}")
        return _auto_axes(layout)
    if not isinstance(dynamic_axes, Mapping):
        raise TypeError(f"dynamic_axes must be a dict {{input name: {{axis: name}}}} or 'auto', "
                        f"got {type(dynamic_axes).__name__}")
    shapes = dict(zip(layout.names, (tuple(t.shape) for t in layout.tensors)))
    out: dict[str, dict[int, str]] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, where first seen)
    for name, spec in dynamic_axes.items():
        if name not in shapes:
            raise ValueError(f"dynamic_axes names unknown input {name!r}; the model's tensor inputs are "
                             f"{', '.join(repr(n) for n in layout.names) or '(none)'}")
        if isinstance(spec, Mapping):
            items = list(spec.items())
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            items = [(axis, f"{name}_dim{axis}") for axis in spec]
        else:
            raise TypeError(f"dynamic_axes[{name!r}] must map axis -> name (e.g. {{0: 'batch'}}) or list "
                            f"axes, got {spec!r}")
        shape, axes = shapes[name], {}
        for axis, dim in items:
            if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
                raise ValueError(f"dynamic_axes[{name!r}]: axis {axis!r} is out of range for an input of "
                                 f"shape {list(shape)}")
            if not isinstance(dim, str) or not dim.isidentifier():
                raise ValueError(f"dynamic_axes[{name!r}][{axis}]: the dim name must be an identifier "
                                 f"such as 'batch' or 'seq', got {dim!r}")
            axis %= len(shape)
            size = shape[axis]
            if size < 2:
                raise ValueError(f"dynamic axis {dim!r} (axis {axis} of {name!r}) has size {size} in the "
                                 "example inputs; torch.export specialises sizes 0 and 1, so give example "
                                 "inputs with size >= 2 on every dynamic axis")
            first = sizes.setdefault(dim, (size, f"axis {axis} of {name!r}"))
            if first[0] != size:
                raise ValueError(f"dynamic axis {dim!r} is {first[1]} (size {first[0]}) and axis {axis} of "
                                 f"{name!r} (size {size}); axes that share a name must have the same size")
            axes[axis] = dim
        if axes:
            out[name] = axes
    return out


def _dynamic_shapes(axes: dict[str, dict[int, str]], layout: _Layout, flat: bool) -> Any:
    """``torch.export`` dynamic shapes: one ``Dim`` per dim name, shared across inputs."""
    if not axes:
        return None
    dims = {d: torch.export.Dim(d) for spec in axes.values() for d in spec.values()}
    per_input = [{a: dims[d] for a, d in axes[n].items()} if n in axes else None for n in layout.names]
    if flat:
        return {"tensors": tuple(per_input)}
    by_arg = dict(zip((name for name, _ in layout.slots), per_input))
    return {name: by_arg.get(name) for name in layout.arguments}


#: how the re-check grows dynamic axes: first ``batch+1`` / ``seq+3`` (axis 0 / others); if torch itself
#: rejects those sizes (e.g. a reshape needs an even batch), twice the example sizes.
_GROWTH: tuple[Callable[[int, int], int], ...] = (lambda size, axis: size + (1 if axis == 0 else 3),
                                                   lambda size, axis: 2 * size)


def _resized(axes: dict[str, dict[int, str]], layout: _Layout,
             grow: Callable[[int, int], int]) -> list[torch.Tensor]:
    """The example tensors grown on their dynamic axes to ``grow(size, axis)``.

    Values are repeated cyclically along the grown axes, so token ids and masks stay valid.
    """
    new_size: dict[str, int] = {}
    for name, spec in axes.items():
        t = layout.tensors[layout.names.index(name)]
        for axis, dim in spec.items():
            new_size.setdefault(dim, grow(t.shape[axis], axis))
    out = []
    for name, t in zip(layout.names, layout.tensors):
        for axis, dim in axes.get(name, {}).items():
            index = torch.arange(new_size[dim], device=t.device) % t.shape[axis]
            t = t.index_select(axis, index)
        out.append(t)
    return out


def _grown_case(model: nn.Module, layout: _Layout, axes: dict[str, dict[int, str]],
                notes: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Inputs with other sizes on the dynamic axes that torch accepts, and torch's outputs on them."""
    failures = []
    for grow in _GROWTH:
        tensors = _resized(axes, layout, grow)
        try:
            with torch.no_grad():
                out = layout.call_inputs(tensors).call(model)
        except Exception as e:  # noqa: BLE001 - the model itself rejects these sizes: try others
            failures.append(f"{_describe(layout.names, tensors)} ({_first_lines(e, 1)})")
            continue
        return tensors, [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    notes.append("dynamic axes not re-checked at other sizes: torch fails on " + "; ".join(failures))
    log.warning("%s", notes[-1])
    return None


def _describe(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{n}{list(t.shape)}" for n, t in zip(names, tensors))


# --- exporter plumbing ----------------------------------------------------------------------------

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


def _first_lines(exc: BaseException, limit: int = 6) -> str:
    """The useful part of an exporter error: the exception summary when torch gives one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = re.search(r"## Exception summary\s*\n(.*?)(\n\n\(Refer|\Z)", text, re.S)
    body = summary.group(1).strip() if summary else text.strip()
    lines = [ln for ln in body.splitlines() if ln.strip()][:limit]
    return "\n    ".join(lines) or type(exc).__name__


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every module's training flag, hooks and attributes are as before.

    Running a model can leave state behind (e.g. transformers installs output-capturing hooks on the
    first call with ``output_hidden_states``); hooks and attributes added meanwhile are removed, so the
    caller's model is exactly as it was (the library re-creates them lazily when needed).
    """
    before = [(m, m.training, {h: set(getattr(m, h, None) or ()) for h in _HOOK_DICTS}, set(vars(m)))
              for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        removed = 0
        for m, training, hooks, attrs in before:
            m.training = training
            for h, keys in hooks.items():
                table = getattr(m, h, None)
                for key in [k for k in (table or ()) if k not in keys]:
                    del table[key]
                    removed += h in _HOOK_DICTS[:4]
            for attr in set(vars(m)) - attrs:
                del vars(m)[attr]
        if removed:
            log.debug("removed %d hooks that running %s installed", removed, type(model).__name__)


def _export_error(exc: BaseException, model: nn.Module, inputs: ExampleInputs,
                  dynamic: bool) -> OnnxExportError:
    """A clear error for a failed ``torch.onnx.export``: which step failed, where, and what to try."""
    head = f"ONNX export of {type(model).__name__} on {inputs.describe()} failed"
    if type(exc).__name__ == "TorchExportError":  # step 1: torch.export; graphopt's capture diagnosis applies
        from .capture import _chain, diagnose

        text = "\n".join(str(e) for e in _chain(exc))
        if dynamic and ("Constraints violated" in text or "specializ" in text or "specialis" in text):
            return OnnxExportError(f"{head}: the model fixes the size of a dynamic axis.\n"
                                   f"    {_first_lines(exc, 12)}\n  try: drop that axis from dynamic_axes, "
                                   "or follow torch's suggested Dim range")
        return OnnxExportError(f"{head} in torch.export (step 1 of 3):\n{diagnose(exc, model, inputs)}")
    return OnnxExportError(f"{head} while translating to ONNX:\n    {_first_lines(exc)}\n"
                           "  try: an op without an ONNX translation needs custom_translations={op overload: "
                           "onnxscript function}; or pass opset=<newer opset>")


def _check_materialised(model: nn.Module, layout: _Layout) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} has {len(meta)} parameters/buffers on the meta device "
                         f"(e.g. {meta[0]!r}); ONNX needs real weights. Materialise them first, e.g. "
                         "model.to_empty(device='cpu') then load_state_dict(...), or from_pretrained(...)")
    meta_inputs = [n for n, t in zip(layout.names, layout.tensors) if t.is_meta]
    if meta_inputs:
        raise ValueError(f"example inputs {meta_inputs} are on the meta device; pass real tensors")


# --- the file: info, checker, onnxruntime ---------------------------------------------------------

def _file_info(path: Path) -> tuple[int, int, bool, dict, dict]:
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


def _check_dynamic_dims(path: Path, shapes: dict[str, tuple[int | str, ...]],
                        axes: dict[str, dict[int, str]]) -> None:
    """Refuse a file whose inputs kept a fixed size on an axis the caller marked dynamic."""
    fixed = [f"{dim!r} (axis {axis} of {name!r}) has the fixed size {shapes[name][axis]}"
             for name, spec in axes.items() if name in shapes for axis, dim in spec.items()
             if isinstance(shapes[name][axis], int)]
    if fixed:
        raise _fail(path, "the exported graph is specialised to the example shape: dynamic axis "
                          + "; ".join(fixed) + ". The model's code fixes that size (e.g. a branch or "
                          "reshape on it): make the code shape-generic, or drop the axis from dynamic_axes")


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_ort(session: Any, names: list[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, str]:
    """``(max abs error, problem)``; ``problem`` is empty when ``got`` matches ``ref`` within tolerance."""
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
    if bool(close.all()):
        return max_abs, ""
    excess = torch.where(close, torch.zeros_like(diff), diff - rtol * r.abs())
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    n_bad = int((~close).sum())
    return max_abs, (f"output {name!r}: {n_bad} of {ref.numel()} values outside atol={atol:g} + "
                     f"rtol={rtol:g}*|torch|; max abs error {max_abs:.3g}; worst at index {list(worst)}: "
                     f"onnxruntime {float(g[worst]):.6g} vs torch {float(r[worst]):.6g}")


def _fail(path: Path, message: str) -> OnnxVerificationError:
    """Move the unverified file out of the way and build the error."""
    failed = path.with_name(path.name + ".failed")
    if path.exists():
        os.replace(path, failed)
        where = f"the file was moved to {failed} for inspection; nothing is left at {path}"
    else:
        failed, where = None, "no file was written"
    log.error("ONNX export of %s refused: %s", path.name, message.splitlines()[0])
    return OnnxVerificationError(f"{message}\n  {where}", failed)


def _verify(path: Path, model: nn.Module, layout: _Layout, out_names: list[str],
            reference: list[torch.Tensor], axes: dict[str, dict[int, str]], atol: float,
            rtol: float) -> tuple[list[VerifiedRun], list[str]]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise _fail(path, f"onnx.checker rejected the exported model: {_first_lines(e)}") from e
    try:
        session = _session(path)
    except Exception as e:
        raise _fail(path, f"onnxruntime cannot load the exported model: {_first_lines(e)}") from e
    runs: list[VerifiedRun] = []
    notes: list[str] = []
    cases = [(layout.tensors, reference)]
    if axes:
        grown = _grown_case(model, layout, axes, notes)
        cases += [grown] if grown is not None else []
    for tensors, ref in cases:
        described = _describe(layout.names, tensors)
        try:
            got = _run_ort(session, layout.names, tensors)
        except OnnxExportError as e:
            raise _fail(path, str(e)) from e
        except Exception as e:
            grown = tensors is not layout.tensors
            hint = "; the graph is probably specialised to the example shape" if grown else ""
            raise _fail(path, f"onnxruntime failed on {described}{hint}: {_first_lines(e)}") from e
        if len(got) != len(ref):
            raise _fail(path, f"onnxruntime returned {len(got)} outputs, torch {len(ref)} (on {described})")
        worst, problems = 0.0, []
        for name, g, r in zip(out_names, got, ref):
            err, problem = _compare(name, g, r, atol, rtol)
            worst = max(worst, err)
            if problem:
                problems.append(problem)
        if problems:
            raise _fail(path, f"onnxruntime disagrees with torch on {described}:\n  " + "\n  ".join(problems))
        runs.append(VerifiedRun(described, worst))
        log.info("onnxruntime matches torch on %s (max abs error %.2e)", described, worst)
    return runs, notes


# --- the entry point ------------------------------------------------------------------------------

def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_axes: DynamicAxes | None = None, opset: int | None = None, atol: float = 1e-4,
                rtol: float = 1e-3, check: bool = True, external_data: bool | None = None,
                custom_translations: Mapping[Callable, Callable] | None = None) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and verify the file in onnxruntime against torch.

    Args:
        model: the model; exported in eval mode, left unchanged (training flags restored).
        example_inputs: a tensor, a tuple of positional args, a dict of keyword args, or ExampleInputs.
        path: the ``.onnx`` file to write (parent folders are created).
        dynamic_axes: ``{input name: {axis: dim name}}``, e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``
            (axes that share a name share a size), or ``"auto"``: axis 0 of every input is ``batch`` and
            axis 1 of 2-D integer inputs (token ids, masks) is ``seq``. Dynamic axes are re-verified
            with other sizes (``batch+1``, ``seq+3``).
        opset: ONNX opset version (default: the exporter's).
        atol, rtol: an output value passes when ``|ort - torch| <= atol + rtol * |torch|``.
        check: run ``onnx.checker`` and the onnxruntime comparison (strongly recommended).
        external_data: store weights in ``<path>.data``; ``None`` does so only above 2 GB.
        custom_translations: extra ``{op overload: onnxscript function}`` for custom ops.

    Returns:
        An :class:`ExportReport` (path, opset, size, input/output shapes, errors); ``os.fspath`` works on it.

    Raises:
        OnnxVerificationError: the checker or onnxruntime disagreed; the file is renamed ``<path>.failed``.
        OnnxExportError: torch.onnx.export failed. ValueError/TypeError/InputError: bad arguments.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    inputs = as_example_inputs(example_inputs)
    layout = _layout(model, inputs)
    _check_materialised(model, layout)
    axes = _normalise_axes(dynamic_axes, layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if model.training:
        log.info("exporting %s in eval mode (its training mode is restored afterwards)", type(model).__name__)
    with _preserved(model):
        with torch.no_grad():
            output = inputs.call(model)
        reference, names = _output_names(output, layout.names)
        flat = bool(axes) and not layout.simple
        target: nn.Module = _FlatCall(model, layout) if flat else model
        if flat:
            args, kwargs = tuple(layout.tensors), {}
        else:
            bound = layout.bind(layout.tensors)
            args, kwargs = tuple(bound.args), dict(bound.kwargs)
        log.info("exporting %s to %s (dynamic axes: %s)", type(model).__name__, path, axes or "none")
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    target, args, kwargs=kwargs, dynamo=True, verbose=False, opset_version=opset,
                    input_names=layout.names, output_names=names,
                    dynamic_shapes=_dynamic_shapes(axes, layout, flat),
                    custom_translation_table=_translations(custom_translations) or None)
                program.save(path, external_data=external_data)
            del program
        except Exception as e:
            raise _export_error(e, model, inputs, bool(axes)) from e
        info = _file_info(path)
        _check_dynamic_dims(path, info[3], axes)
        out_names = names or [f"output_{i}" for i in range(len(reference))]
        runs: list[VerifiedRun] = []
        notes: list[str] = []
        if check:
            runs, notes = _verify(path, model, layout, out_names, reference, axes, atol, rtol)
        else:
            log.warning("ONNX file %s written without verification (check=False)", path)
    opset_used, size, external, in_shapes, out_shapes = info
    report = ExportReport(path, opset_used, size, in_shapes, out_shapes, axes, tuple(runs), external,
                          time.perf_counter() - start, tuple(notes))
    log.info("%s", report)
    return report
