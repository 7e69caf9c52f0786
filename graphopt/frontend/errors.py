"""Why a capture failed: :class:`CaptureError` naming the module, source line, op, cause and what to try."""

from __future__ import annotations

import contextlib
import io
import linecache
import os
import re
import sys
import traceback
from collections.abc import Iterator

import torch
from torch import nn

from .inputs import ExampleInputs, missing_inputs

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CAPTURE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # frames of graphopt's own capture code


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the failing module/op and what to try.

    Attributes: ``module_path`` (FQN of the innermost module running at the failure, ``""`` for the
    root, ``None`` when no module was running, e.g. an unsupported output type), ``op`` (the aten
    operator being dispatched, if any), ``cause``, ``hint``, ``location`` (``file:line  code`` of the
    failing source line) and ``partial_graph`` (the graph traced up to the failure, when torch gives it).
    """

    def __init__(self, message: str, *, module_path: str | None = None, op: str = "", cause: str = "",
                 hint: str = "", location: str = "", partial_graph: str = "") -> None:
        super().__init__(message)
        self.module_path = module_path
        self.op = op
        self.cause = cause
        self.hint = hint
        self.location = location
        self.partial_graph = partial_graph


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _short_file(path: str) -> str:
    return path.split("site-packages" + os.sep)[-1]


def _failure_site(exc: BaseException, model: nn.Module) -> tuple[str | None, str, str, str]:
    """``(module_path, module_type, location, op)`` where ``exc`` was raised while running ``model``.

    Read from the traceback frames: ``self`` of each frame gives the innermost model module running,
    a ``func`` local that is an aten OpOverload the operator being dispatched. No hooks are needed and
    the model is not run again.
    """
    names = {id(m): n for n, m in model.named_modules()}
    for e in reversed(exception_chain(exc)):  # the root cause carries the deepest traceback
        path: str | None = None
        mtype, location, op = "", "", ""
        for frame, lineno in traceback.walk_tb(e.__traceback__):
            try:
                owner, func = frame.f_locals.get("self"), frame.f_locals.get("func")
            except Exception:  # noqa: BLE001 - a broken frame must not hide the real error
                owner, func = None, None
            if isinstance(owner, nn.Module) and id(owner) in names:
                path, mtype = names[id(owner)], type(owner).__name__
            if isinstance(func, torch._ops.OpOverload):
                op = str(func)
            filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(_TORCH_DIR) and not filename.startswith(_CAPTURE_DIR) and path is not None:
                code = linecache.getline(filename, lineno).strip()
                location = f"{_short_file(filename)}:{lineno}" + (f"  {code}" if code else "")
        if path is not None:
            return path, mtype, location, op
    return None, "", "", ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def _classify(chain: list[BaseException], module_path: str | None, op: str, inputs: ExampleInputs | None,
              tool: str) -> tuple[str, str]:
    """``(cause, hint)`` for a capture failure."""
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    names = {type(e).__name__ for e in chain}
    described = inputs.describe() if inputs is not None else "the example inputs"
    found = re.search(r"Found <class '([\w.]+)'> in (input|output)", text)
    if found:
        cls, where = found.group(1).rpartition(".")[2], found.group(2)
        if "Cache" in cls:
            return (f"the model returns a {cls} (a KV cache), which {tool} cannot flatten into tensors",
                    "graphopt turns the config's KV cache off for its own runs; drop use_cache=True (or a "
                    "past_key_values cache) from the example inputs so that the model returns tensors only")
        return (f"the model's {where} contains a {cls}, which {tool} cannot flatten into tensors",
                f"use tensors, tuples or dicts there, or register {cls} as a pytree node "
                "(torch.utils._pytree.register_pytree_node, or torch.export.register_dataclass)")
    if "inputs to control flow" in text:  # fx: any branch on a traced tensor, value or shape
        return (f"Python control flow on a traced value: {tool} cannot branch on tensors or their shapes",
                "capture with torch.export (method='export'), which handles branches on shapes; "
                "rewrite branches on tensor values with torch.cond or torch.where")
    if "GuardOnDataDependentSymNode" in names or "data-dependent" in text:
        return ("data-dependent control flow: Python code branches on (or reads) a tensor's value, "
                "e.g. `if x.sum() > 0:`, `.item()`, `.tolist()`",
                "rewrite it with torch.cond (both branches traced) or torch.where / tensor arithmetic, or "
                "decide it from shapes or the config instead of tensor values")
    if "UnsupportedOperatorException" in names or "fake impl" in text.lower() or "no fake" in text.lower():
        return ("an operator has no fake (meta) kernel, so its output shape cannot be inferred",
                "register one with torch.library.register_fake for a custom op, or keep the op out of "
                "the captured model")
    if tool != "torch.export" and "Proxy" in text:
        return (f"{tool} cannot trace this Python code (it treats values as symbolic proxies)",
                "capture with torch.export instead (method='export'), which traces HuggingFace models")
    if chain and isinstance(chain[-1], TypeError) and module_path in ("", None) and "argument" in text:
        return ("the example inputs do not fit forward()'s signature",
                f"pass inputs the model runs on eagerly (given: {described})")
    return (f"operator {op} failed on the traced tensors" if op else f"{tool} failed",
            f"check that the model runs eagerly on the example inputs ({described}); "
            "torch.export.draft_export(model, args, kwargs) reports every problem at once")


def diagnose(exc: BaseException, model: nn.Module, inputs: ExampleInputs | None,
             tool: str = "torch.export") -> CaptureError:
    """Turn an exception raised while capturing ``model`` into an informative :class:`CaptureError`."""
    chain = exception_chain(exc)
    module_path, module_type, location, op = _failure_site(exc, model)
    if module_path is None:
        where = f"outside any module's forward (in the inputs or outputs of {type(model).__name__})"
    elif module_path == "":
        where = f"(root) {type(model).__name__}"
    else:
        where = f"{module_path} ({module_type})"
    partial = next((str(e.partial_fx_graph) for e in chain if getattr(e, "partial_fx_graph", None)), "")
    if not op and partial:  # e.g. a guard on a value: the last op traced is the one read (aten.item)
        traced = re.findall(r"torch\.ops\.(aten\.[\w.]+)\(", partial)
        op = traced[-1] if traced else ""
    cause, hint = _classify(chain, module_path, op, inputs, tool)
    lines = [f"{tool} could not capture {type(model).__name__}: {cause}", f"  module: {where}"]
    if location:
        lines.append(f"  code:   {location}")
    if op:
        lines.append(f"  op:     {op}")
    lines += [f"  error:  {first_line(chain[-1])}", f"  try:    {hint}"]
    missing = missing_inputs(model, inputs) if inputs is not None else []
    if missing:
        lines.append(f"  inputs: forward() also takes {', '.join(missing)}, not in the example inputs")
    return CaptureError("\n".join(lines), module_path=module_path, op=op, cause=cause, hint=hint, location=location,
                        partial_graph=partial)


@contextlib.contextmanager
def stderr_without_partial_graph() -> Iterator[list[str]]:
    """Hold stderr back while tracing; replay it without torch's dump of the partial graph.

    torch.export prints the partial graph to stderr several times on failure; CaptureError keeps it
    in ``partial_graph`` instead. Everything else written to stderr is passed through.
    """
    buffer, drop = io.StringIO(), []
    try:
        with contextlib.redirect_stderr(buffer):
            yield drop
    finally:
        text = buffer.getvalue()
        for chunk in drop:
            text = text.replace(chunk + "\n", "")
        if text.strip():
            sys.stderr.write(text)
