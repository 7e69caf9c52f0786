"""Capture: turn a module + example inputs into a Program whose graph is an analysis.

``torch.export.export(strict=False)`` is the main path (aten graph, parameter FQNs in the graph
signature, ``nn_module_stack`` on every op node, FakeTensor values in ``node.meta["val"]``); it works
with weights on the ``meta`` device. ``torch.fx.symbolic_trace`` is the graph-mode path for models it
can trace. Analyses registered here:

- ``"exported"``: the :class:`torch.export.ExportedProgram`;
- ``"fx_graph"``: a :class:`torch.fx.GraphModule` (shapes in ``node.meta["tensor_meta"]``);
- ``"graph"``: a networkx view of the exported graph (see :func:`graph_view`).

A model that cannot be captured raises :class:`CaptureError` naming the module and source line
that failed, the cause, and what to try. Capture never changes the caller's model.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.export import ExportedProgram

from .analysis import AnalysisManager, register_analysis
from .inputs import ExampleInputs, as_example_inputs
from .program import Program

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


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


# --- node helpers (exported and fx graphs) ---------------------------------------------------------

def _clean_path(path: str) -> str:
    """Normalise a module path from ``nn_module_stack`` (strict-mode ``L['self'].a[0]`` -> ``a.0``)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")


def _stack_top(node: fx.Node) -> tuple[str, Any] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack.values()))


def node_module_path(node: fx.Node) -> str:
    """FQN of the innermost module that produced ``node`` (``""`` for the root or unknown)."""
    if node.op == "call_module":
        return str(node.target)
    top = _stack_top(node)
    return _clean_path(top[0]) if top else ""


def node_module_type(node: fx.Node) -> str:
    """Class name (no module prefix) of the innermost module that produced ``node``, or ``""``."""
    top = _stack_top(node)
    if top is None:
        return ""
    cls = top[1]
    return (cls.__name__ if isinstance(cls, type) else str(cls)).rpartition(".")[2]


def node_param_fqn(exported: ExportedProgram | None, node: fx.Node) -> str | None:
    """FQN of the parameter, buffer or lifted constant that placeholder/get_attr ``node`` stands for."""
    if node.op == "get_attr":
        return str(node.target)
    if node.op != "placeholder" or exported is None:
        return None
    sig = exported.graph_signature
    for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
        if node.name in table:
            return table[node.name]
    return None


def param_nodes(exported: ExportedProgram) -> dict[str, fx.Node]:
    """Map each parameter/buffer/constant FQN to its placeholder node in the exported graph."""
    by_name = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    sig = exported.graph_signature
    out: dict[str, fx.Node] = {}
    for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
        out.update({fqn: by_name[name] for name, fqn in table.items() if name in by_name})
    return out


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """Groups of parameter/buffer FQNs that are the same tensor (tied weights), each sorted."""
    groups: dict[int, list[str]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        groups.setdefault(id(t), []).append(name)
    return [sorted(set(g)) for g in groups.values() if len(set(g)) > 1]


def node_value_info(node: fx.Node) -> tuple[tuple[int | str, ...] | None, str | None]:
    """``(shape, dtype)`` of a node's tensor value (export ``val`` or fx ``tensor_meta``); SymInts as str."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))  # tensor_meta is a NamedTuple with .shape
    if isinstance(val, (tuple, list)) and not hasattr(val, "shape"):
        val = next((v for v in val if hasattr(v, "shape")), None)
    if val is None or not hasattr(val, "shape"):
        return None, None
    shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
    return shape, str(val.dtype).removeprefix("torch.")


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
    return str(node.target)


def graph_view(graph: ExportedProgram | fx.GraphModule) -> nx.DiGraph:
    """A networkx DiGraph of an exported (or fx) graph, one graph node per fx node (keyed by name).

    Node attributes: ``op`` (fx op kind), ``target`` (e.g. ``aten.linear.default``), ``kind``
    (``input``/``parameter``/``buffer``/``constant``/``op``/``output``), ``module`` (FQN of the
    innermost module; a parameter's owner), ``module_type``, ``param`` (FQN or None), ``shape``,
    ``dtype`` and ``node`` (the fx node itself). Edge ``u -> v`` carries ``pos``: the positions of
    ``u`` in ``v``'s flattened args/kwargs.
    """
    exported = graph if isinstance(graph, ExportedProgram) else None
    gm_graph = graph.graph
    kinds: dict[str, str] = {}  # placeholder name (export) or get_attr target (fx) -> kind
    if exported is not None:
        sig = exported.graph_signature
        kinds.update({k: "parameter" for k in sig.inputs_to_parameters})
        kinds.update({k: "buffer" for k in sig.inputs_to_buffers})
        kinds.update({k: "constant" for k in sig.inputs_to_lifted_tensor_constants})
    else:
        kinds.update({k: "parameter" for k, _ in graph.named_parameters(remove_duplicate=False)})
        kinds.update({k: "buffer" for k, _ in graph.named_buffers(remove_duplicate=False)})
    g = nx.DiGraph(source="torch.export" if exported is not None else "torch.fx")
    for node in gm_graph.nodes:
        param = node_param_fqn(exported, node)
        if node.op == "placeholder":
            kind = kinds.get(node.name, "input")
        elif node.op == "get_attr":
            kind = kinds.get(str(node.target), "constant")
        else:
            kind = "output" if node.op == "output" else "op"
        module = param.rpartition(".")[0] if param is not None else node_module_path(node)
        shape, dtype = node_value_info(node)
        g.add_node(node.name, op=node.op, target=_target_name(node), kind=kind, module=module,
                   module_type=node_module_type(node), param=param, shape=shape, dtype=dtype, node=node)
        flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        for pos, arg in enumerate(flat):
            if isinstance(arg, fx.Node):
                if g.has_edge(arg.name, node.name):
                    g.edges[arg.name, node.name]["pos"].append(pos)
                else:
                    g.add_edge(arg.name, node.name, pos=[pos])
    return g


# --- failure diagnosis ---------------------------------------------------------------------------

def _chain(exc: BaseException) -> list[BaseException]:
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
    for e in reversed(_chain(exc)):  # the root cause carries the deepest traceback
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
            if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE and path is not None:
                code = linecache.getline(filename, lineno).strip()
                location = f"{_short_file(filename)}:{lineno}" + (f"  {code}" if code else "")
        if path is not None:
            return path, mtype, location, op
    return None, "", "", ""


def _first_line(exc: BaseException) -> str:
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
                    "pass use_cache=False (in the example inputs, or set model.config.use_cache = False) "
                    "so that the model returns tensors only")
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
    chain = _chain(exc)
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
    lines += [f"  error:  {_first_line(chain[-1])}", f"  try:    {hint}"]
    return CaptureError("\n".join(lines), module_path=module_path, op=op, cause=cause, hint=hint, location=location,
                        partial_graph=partial)


@contextlib.contextmanager
def _stderr_without_partial_graph() -> Iterator[list[str]]:
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


# --- capture -------------------------------------------------------------------------------------

def export_program(module: nn.Module, inputs: Any) -> ExportedProgram:
    """``torch.export.export(strict=False)`` under no_grad; failures raise :class:`CaptureError`."""
    inputs = as_example_inputs(inputs)
    with _stderr_without_partial_graph() as drop:
        try:
            with torch.no_grad():
                return torch.export.export(module, inputs.args, inputs.kwargs, strict=False)
        except Exception as e:
            err = diagnose(e, module, inputs, "torch.export")
            if err.partial_graph:
                drop.append(err.partial_graph)
                log.debug("partial graph at the failure:\n%s", err.partial_graph)
            raise err from e


def _placeholder_values(gm: fx.GraphModule, inputs: ExampleInputs) -> list[Any] | None:
    values: list[Any] = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if str(node.target).startswith("*"):
            return None
        if i < len(inputs.args):
            values.append(inputs.args[i])
        elif node.target in inputs.kwargs:
            values.append(inputs.kwargs[node.target])
        elif node.args:  # the forward() default, stored by symbolic_trace
            values.append(node.args[0])
        else:
            return None
    return values


def trace_fx(module: nn.Module, inputs: Any = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` (the GraphModule shares the module's parameters), with shapes.

    With ``inputs``, shapes are propagated on fake tensors into ``node.meta["tensor_meta"]`` (a best
    effort: a failure there is logged, not raised). Failures to trace raise :class:`CaptureError`.
    """
    ex = as_example_inputs(inputs) if inputs is not None else None
    with _stderr_without_partial_graph():
        try:
            gm = fx.symbolic_trace(module)
        except Exception as e:
            raise diagnose(e, module, ex, "torch.fx.symbolic_trace") from e
    if ex is not None:
        _propagate_shapes(gm, ex, module)
    return gm


def _propagate_shapes(gm: fx.GraphModule, inputs: ExampleInputs, module: nn.Module) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    values = _placeholder_values(gm, inputs.to(device))  # only shapes matter: follow the weights' device
    if values is None:
        return
    printed = io.StringIO()
    try:  # on fake tensors: no compute, and train-mode BatchNorm statistics stay untouched
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
    except Exception as e:  # noqa: BLE001 - shapes are an extra; the trace itself succeeded
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        log.warning("fx shape propagation failed on %s (no shapes on the fx graph): %s",
                    type(module).__name__, _first_line(e))
        log.debug("%s", printed.getvalue())


@register_analysis("exported")
def _exported(program: Program, am: AnalysisManager) -> ExportedProgram:
    return export_program(program.module, program.example_inputs)


@register_analysis("fx_graph")
def _fx_graph(program: Program, am: AnalysisManager) -> fx.GraphModule:
    return trace_fx(program.module, program.example_inputs)


@register_analysis("graph")
def _graph(program: Program, am: AnalysisManager) -> nx.DiGraph:
    return graph_view(am.get("exported"))


_METHODS = {"export": "exported", "fx": "fx_graph"}


def capture(model: nn.Module, example_inputs: Any, *, calib: Any = None, method: str = "export") -> Program:
    """Capture ``model`` on ``example_inputs`` into a Program; the graph is computed now and cached.

    ``method="export"`` (default) caches the ``"exported"`` analysis (torch.export, non-strict);
    ``method="fx"`` caches ``"fx_graph"`` (torch.fx.symbolic_trace). The model is not copied and
    never changed (``optimize`` works on a copy). Raises :class:`CaptureError` when it cannot be captured.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose 'export' (torch.export) or 'fx' "
                         "(torch.fx.symbolic_trace)")
    program = Program(model, as_example_inputs(example_inputs), calib=calib)
    start = time.perf_counter()
    program.analyses.get(_METHODS[method])
    log.info("captured %s with %s in %.2fs", type(model).__name__, method, time.perf_counter() - start)
    return program
