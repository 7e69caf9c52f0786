"""The Program: the module tree (program of record), example inputs, and a log of structural edits.

Passes change a model only through a Program's edit methods. Each edit is recorded as JSON-able
data, so :func:`graphopt.save` can write it next to the weights and :func:`graphopt.load` can
replay it on a freshly built base model before loading them (no pickle anywhere).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.blocks import BlockCursor
from ..analysis.manager import AnalysisManager
from ..frontend.inputs import ExampleInputs, as_example_inputs
from ..nn.spec import ModuleSpecError, build_module, module_spec

log = logging.getLogger(__name__)


class EditError(ValueError):
    """A Program edit names something that does not exist or cannot be recorded."""


@dataclass
class Edit:
    """One structural change: ``op`` on ``target`` with JSON-able ``data``, made by pass ``by``."""

    op: str  # "replace_module" | "remove_items" | "set_tensor" | "set_layout" | "tie" | "set_attr" | "set_config"
    target: str
    data: dict[str, Any] = field(default_factory=dict)
    by: str = ""
    kind: str = ""  # the kind of change the pass declares (Pass.change): "" for exact rewrites

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Edit:
        return Edit(op=d["op"], target=d["target"], data=dict(d.get("data", {})), by=d.get("by", ""),
                    kind=d.get("kind", ""))


def _split(fqn: str) -> tuple[str, str]:
    owner, _, name = fqn.rpartition(".")
    return owner, name


def _get_submodule(root: nn.Module, fqn: str) -> nn.Module:
    try:
        return root.get_submodule(fqn)
    except AttributeError as e:
        raise EditError(f"no submodule {fqn!r} in {type(root).__name__}: {e}") from None


@contextlib.contextmanager
def swapped_modules(root: nn.Module, swaps: dict[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    """Inside: each module of ``root`` named in ``swaps`` is replaced by the given one, with no edit recorded
    (a trial: measure a candidate, save in another layout); afterwards, also on an exception or an interrupt,
    the old modules are back. Yields the old modules by name. The one way graphopt swaps modules outside the
    edit log (``Program.trial``)."""
    old: dict[str, nn.Module] = {}
    try:
        for fqn, module in swaps.items():
            parent_name, attr = _split(fqn)
            parent = _get_submodule(root, parent_name)
            old[fqn] = getattr(parent, attr)
            setattr(parent, attr, module)
        yield dict(old)
    finally:
        for fqn, module in reversed(list(old.items())):
            parent_name, attr = _split(fqn)
            setattr(_get_submodule(root, parent_name), attr, module)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Program:
    """A model under optimisation: root module, example inputs, calibration data, edits, analyses.

    ``original`` is the model given to ``optimize`` (a distillation teacher, say): passes read it and
    never change it (not even its train/eval mode without restoring it).
    """

    def __init__(self, module: nn.Module, example_inputs: Any, *, calib: Iterable[Any] | None = None,
                 original: nn.Module | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        self.module = module
        self.example_inputs: ExampleInputs = as_example_inputs(example_inputs)
        self.calib = calib
        self.original = original
        self.edits: list[Edit] = []
        self.analyses = AnalysisManager(self)
        self.current_pass = ""
        self.current_change = ""  # the running pass's Pass.change, recorded in each edit
        #: set by a run streamed from disk (graphopt.stream): the one block whose weights are loaded, and its inputs
        self.stream: BlockCursor | None = None
        #: set by a run streamed from disk while a ``Pass.streams_by_forwards`` pass runs: see :meth:`loaded`
        self.weights_of: Callable[[str], contextlib.AbstractContextManager[None]] | None = None

    # --- reading -------------------------------------------------------------------------------
    def get_submodule(self, fqn: str) -> nn.Module:
        return _get_submodule(self.module, fqn) if fqn else self.module

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return self.module.named_modules()

    def run(self, inputs: Any | None = None) -> Any:
        """Call the module on ``inputs`` (default: the example inputs) without autograd."""
        ex = self.example_inputs if inputs is None else as_example_inputs(inputs)
        with torch.no_grad():
            return ex.call(self.module)

    def loaded(self, fqn: str) -> contextlib.AbstractContextManager[None]:
        """``with program.loaded(name):`` submodule ``name`` holds its weights inside. In memory they always do; in a
        run streamed from disk (:mod:`graphopt.stream.on_demand`) they are read from the files for the code inside
        (a pass that reads weights outside a forward of the model) and freed after, unless the pass set new ones."""
        return self.weights_of(fqn) if self.weights_of is not None else contextlib.nullcontext()

    def calib_batches(self, limit: int | None = None) -> list[Any]:
        """The calibration batches a pass reads: every one, or at most ``limit``.

        From a sequence (a list, a dataset) the ``limit`` batches are spread evenly over it, first and last
        included, so that data sorted by length or source stays represented; from any other iterable (a
        DataLoader) they are its first ``limit``. Every pass picks its batches here, so two passes asking for
        the same number read the same batches. Raises ``ValueError`` when the program has no calibration data.
        """
        if self.calib is None:
            raise ValueError(f"{self.current_pass or 'this pass'} reads calibration data: pass calib=<iterable of "
                             "model inputs> to optimize()")
        if limit is None:
            return list(self.calib)
        if limit < 1:
            raise ValueError(f"calib_batches: read at least 1 batch, not {limit}")
        if isinstance(self.calib, Sequence) and len(self.calib) > limit:
            last = len(self.calib) - 1
            return [self.calib[round(i * last / max(1, limit - 1))] for i in range(limit)]
        return list(itertools.islice(iter(self.calib), limit))

    @property
    def dependency_graph(self) -> Any:
        """The cached dependency graph analysis (groups of coupled parameter slices)."""
        return self.analyses.get("dependency_graph")

    @property
    def dependency_groups(self) -> list[Any]:
        return self.dependency_graph.groups

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        return torch.device("cpu")

    def trial(self, swaps: dict[str, nn.Module]) -> contextlib.AbstractContextManager[dict[str, nn.Module]]:
        """``with program.trial({name: module}):`` the modules are in place, unrecorded, and always put back
        (:func:`swapped_modules`)."""
        return swapped_modules(self.module, swaps)

    # --- edits ---------------------------------------------------------------------------------
    def replace_module(self, fqn: str, new: nn.Module) -> nn.Module:
        """Swap the submodule at ``fqn`` for ``new``; return the old one."""
        if not fqn:
            raise EditError("replace_module needs a submodule name; the root module cannot be replaced")
        owner_name, attr = _split(fqn)
        owner = self.get_submodule(owner_name)
        old = getattr(owner, attr, None)
        if not isinstance(old, nn.Module):
            raise EditError(f"{fqn!r} is not a submodule of {type(self.module).__name__}")
        try:
            spec: dict[str, Any] | None = module_spec(new)
        except ModuleSpecError as e:
            spec = {"unrecordable": str(e)}
        setattr(owner, attr, new)
        self._log("replace_module", fqn, spec)
        return old

    def remove_items(self, fqn: str, indices: Iterable[int]) -> list[nn.Module]:
        """Remove items ``indices`` of the ``nn.ModuleList`` at ``fqn`` (the rest renumbered); return them."""
        items = self.get_submodule(fqn)
        drop = sorted(set(int(i) for i in indices))
        if not isinstance(items, nn.ModuleList):
            raise EditError(f"{fqn!r} is a {type(items).__name__}, not an nn.ModuleList")
        if not drop or drop[0] < 0 or drop[-1] >= len(items):
            raise EditError(f"indices {drop} are not items of {fqn!r} (it has {len(items)})")
        removed = _remove_items(items, drop)
        self._log("remove_items", fqn, {"indices": drop})
        return removed

    def set_tensor(self, fqn: str, value: torch.Tensor | None, *, buffer: bool | None = None,
                   requires_grad: bool | None = None) -> None:
        """Create, replace or (``value=None``) remove the parameter or buffer ``fqn``.

        Parameters stay parameters and buffers stay buffers unless ``buffer`` says otherwise; a
        new name becomes a parameter unless ``buffer=True``.
        """
        owner_name, name = _split(fqn)
        owner = self.get_submodule(owner_name)
        is_buffer = name in owner._buffers if buffer is None else buffer
        if value is None:
            if name in owner._parameters:
                owner._parameters[name] = None
            elif name in owner._buffers:
                owner._buffers[name] = None
            else:
                raise EditError(f"{fqn!r} is neither a parameter nor a buffer")
            self._log("set_tensor", fqn, {"remove": True, "buffer": is_buffer})
            return
        data: dict[str, Any] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype), "buffer": is_buffer}
        if is_buffer:
            persistent = name not in owner._non_persistent_buffers_set
            owner._parameters.pop(name, None)
            owner.register_buffer(name, value.detach(), persistent=persistent)
            data["persistent"] = persistent
        else:
            old = owner._parameters.get(name)
            grad = requires_grad if requires_grad is not None else (old.requires_grad if old is not None else True)
            grad = grad and (value.is_floating_point() or value.is_complex())
            owner._buffers.pop(name, None)
            owner._non_persistent_buffers_set.discard(name)
            owner._parameters[name] = nn.Parameter(value.detach(), requires_grad=grad)
            data["requires_grad"] = grad
        self._log("set_tensor", fqn, data)

    def resize(self, fqn: str, dim: int, keep: Any) -> None:
        """Keep only indices ``keep`` of parameter/buffer ``fqn`` along ``dim`` (tied aliases follow)."""
        tensor = self.tensor(fqn)
        index = torch.as_tensor(keep, dtype=torch.long, device=tensor.device)
        aliases = self.aliases(fqn)
        self.set_tensor(fqn, tensor.detach().index_select(dim, index))
        for other in aliases:
            self.tie(other, fqn)

    def tie(self, fqn: str, to: str) -> None:
        """Make the parameter or buffer ``fqn`` the very tensor object ``to`` (tied weights: one copy)."""
        owner_name, name = _split(fqn)
        owner = self.get_submodule(owner_name)
        if name not in owner._parameters and name not in owner._buffers:
            raise EditError(f"{fqn!r} is neither a parameter nor a buffer")
        (owner._parameters if name in owner._parameters else owner._buffers)[name] = self.tensor(to)
        self._log("tie", fqn, {"to": to})

    def aliases(self, fqn: str) -> list[str]:
        """Other names of the same tensor object (tied weights), not including ``fqn``."""
        target = self.tensor(fqn)
        named = list(self.module.named_parameters(remove_duplicate=False))
        named += list(self.module.named_buffers(remove_duplicate=False))
        return [n for n, t in named if t is target and n != fqn]

    def tensor(self, fqn: str) -> torch.Tensor:
        owner_name, name = _split(fqn)
        owner = self.get_submodule(owner_name)
        value = owner._parameters.get(name, owner._buffers.get(name))
        if value is None:
            raise EditError(f"{fqn!r} is neither a parameter nor a buffer")
        return value

    def set_layout(self, fqn: str, memory_format: str) -> None:
        """Store tensor ``fqn`` in ``memory_format`` (``"channels_last"``, ``"channels_last_3d"``): the same values and
        the same Parameter object (hooks, ties and optimizers that hold it keep it), other strides. ``load``
        applies it again after reading the weights, which a file stores contiguous."""
        tensor = self.tensor(fqn)
        _apply_layout(tensor, memory_format)
        self._log("set_layout", fqn, {"memory_format": memory_format})

    def set_attr(self, fqn: str, name: str, value: Any) -> None:
        """Set a plain attribute (e.g. ``in_features``, ``num_heads``) on submodule ``fqn``."""
        try:
            json.dumps(value)
        except TypeError as e:
            raise EditError(f"attribute {fqn}.{name} must be JSON-serialisable to be replayable: {e}") from None
        setattr(self.get_submodule(fqn), name, value)
        data = {"name": name, "value": value}
        if isinstance(value, tuple):  # JSON has no tuples: remember to turn the list back into one
            data["tuple"] = True
        self._log("set_attr", fqn, data)

    def set_config(self, key: str, value: Any) -> None:
        """Set ``key`` of the model's HF config (and of every config copy its submodules hold, as T5's stacks do).

        Keeps ``config.json`` describing the model after a structural change (heads, intermediate
        sizes), so that ``save_pretrained`` + plain ``from_pretrained`` rebuild it.
        """
        configs = model_configs(self.module)
        if not configs:
            raise EditError(f"{type(self.module).__name__} has no config (set_config is for HuggingFace models)")
        try:
            json.dumps(value)
        except TypeError as e:
            raise EditError(f"config value {key}={value!r} must be JSON-serialisable: {e}") from None
        _set_config(self.module, key, value)
        self._log("set_config", "", {"key": key, "value": value})

    def _log(self, op: str, target: str, data: dict[str, Any] | None) -> None:
        self.edits.append(Edit(op, target, data or {}, by=self.current_pass, kind=self.current_change))

    # --- snapshots (for rollback) --------------------------------------------------------------
    def snapshot(self) -> tuple[nn.Module, int]:
        return copy.deepcopy(self.module), len(self.edits)

    def restore(self, snap: tuple[nn.Module, int]) -> None:
        module, n_edits = snap
        # Keep the root object's identity (callers of inplace=True hold it): swap its state back.
        self.module.__dict__.clear()
        self.module.__dict__.update(module.__dict__)
        del self.edits[n_edits:]
        self.analyses.clear()


def model_configs(root: nn.Module) -> list[Any]:
    """The distinct HF config objects of ``root``'s module tree (the model's own first)."""
    seen: dict[int, Any] = {}
    for m in root.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _set_config(root: nn.Module, key: str, value: Any) -> None:
    configs = model_configs(root)
    for config in configs:  # the root's config, and the copies submodules hold where they have the key
        if config is configs[0] or hasattr(config, key):
            setattr(config, key, value)


#: the memory formats ``set_layout`` stores tensors in, by name (and the tensor rank each applies to)
LAYOUTS = {"channels_last": (torch.channels_last, 4), "channels_last_3d": (torch.channels_last_3d, 5)}


def _apply_layout(tensor: torch.Tensor, memory_format: str) -> None:
    if memory_format not in LAYOUTS:
        raise EditError(f"unknown memory format {memory_format!r}; one of {', '.join(LAYOUTS)}")
    fmt, rank = LAYOUTS[memory_format]
    if tensor.dim() != rank:
        raise EditError(f"{memory_format} is for {rank}-D tensors, this one has shape {list(tensor.shape)}")
    # contiguous(memory_format=) keeps a tensor whose size-1 dims make it both layouts (a 1x1 or a depthwise
    # kernel); oneDNN reads the strides, so write the canonical channels-last ones
    laid = torch.empty_like(tensor.data, memory_format=fmt)
    if laid.stride() != tensor.stride():
        tensor.data = laid.copy_(tensor.data)


def _remove_items(items: nn.ModuleList, drop: list[int]) -> list[nn.Module]:
    removed = [items[i] for i in drop]
    kept = [m for i, m in enumerate(items) if i not in set(drop)]
    items._modules.clear()
    for i, m in enumerate(kept):
        items._modules[str(i)] = m
    return removed


def _first_device(*modules: nn.Module) -> torch.device:
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            return t.device
    return torch.device("cpu")


def _replay_one(root: nn.Module, edit: Edit) -> None:
    data = edit.data
    if edit.op == "replace_module":
        if "unrecordable" in data:
            raise EditError(f"the module was not recorded: {data['unrecordable']}")
        owner_name, attr = _split(edit.target)
        owner = _get_submodule(root, owner_name) if owner_name else root
        old = getattr(owner, attr, None)
        if not isinstance(old, nn.Module):
            raise EditError(f"{edit.target!r} is not a submodule of {type(root).__name__}")
        with torch.device(_first_device(old, root)):
            new = build_module(data)
        setattr(owner, attr, new)
    elif edit.op == "remove_items":
        items = _get_submodule(root, edit.target)
        drop = [int(i) for i in data["indices"]]
        if not isinstance(items, nn.ModuleList) or not drop or min(drop) < 0 or max(drop) >= len(items):
            raise EditError(f"{edit.target!r} has no items {drop} to remove")
        _remove_items(items, sorted(set(drop)))
    elif edit.op == "set_tensor":
        owner_name, name = _split(edit.target)
        owner = _get_submodule(root, owner_name) if owner_name else root
        if data.get("remove"):
            (owner._buffers if data.get("buffer") else owner._parameters)[name] = None
            return
        dtype = getattr(torch, str(data.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise EditError(f"unknown dtype {data.get('dtype')!r}")
        value = torch.empty(data["shape"], dtype=dtype, device=_first_device(owner, root))
        if data.get("buffer"):
            persistent = data.get("persistent", name not in owner._non_persistent_buffers_set)
            owner._parameters.pop(name, None)
            owner.register_buffer(name, value, persistent=persistent)
        else:
            grad = data.get("requires_grad", True) and (value.is_floating_point() or value.is_complex())
            owner._buffers.pop(name, None)
            owner._non_persistent_buffers_set.discard(name)
            owner._parameters[name] = nn.Parameter(value, requires_grad=grad)
    elif edit.op == "set_layout":
        owner_name, name = _split(edit.target)
        owner = _get_submodule(root, owner_name) if owner_name else root
        tensor = owner._parameters.get(name, owner._buffers.get(name))
        if tensor is None:
            raise EditError(f"{edit.target!r} is neither a parameter nor a buffer")
        _apply_layout(tensor, str(data.get("memory_format")))
    elif edit.op == "tie":  # ``target`` names the same tensor as ``data["to"]`` (tied weights)
        src_owner, src_name = _split(data["to"])
        src = _get_submodule(root, src_owner) if src_owner else root
        tensor = src._parameters.get(src_name, src._buffers.get(src_name))
        owner_name, name = _split(edit.target)
        owner = _get_submodule(root, owner_name) if owner_name else root
        (owner._buffers if name in owner._buffers else owner._parameters)[name] = tensor
    elif edit.op == "set_attr":
        value = tuple(data["value"]) if data.get("tuple") else data["value"]
        setattr(_get_submodule(root, edit.target) if edit.target else root, data["name"], value)
    elif edit.op == "set_config":
        if not model_configs(root):
            raise EditError(f"{type(root).__name__} has no config to set {data.get('key')!r} on")
        _set_config(root, str(data["key"]), data["value"])
    else:
        raise EditError(f"unknown edit op {edit.op!r} (written by a newer graphopt?)")


def replay_edits(root: nn.Module, edits: Iterable[Edit],
                 check: Callable[[int, Edit], None] | None = None) -> nn.Module:
    """Apply the structural part of ``edits`` to ``root``, in order (weights come afterwards).

    New tensors are allocated uninitialised on the device of the module they land in (``meta``
    for a meta-device model). A failing edit raises :class:`EditError` naming its position;
    ``check(i, edit)`` runs before each edit (``load`` validates untrusted logs with it).
    """
    for i, edit in enumerate(edits):
        if check is not None:
            check(i, edit)
        try:
            _replay_one(root, edit)
        except (EditError, ModuleSpecError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            by = f" by pass {edit.by!r}" if edit.by else ""
            raise EditError(f"cannot replay edit #{i} ({edit.op} {edit.target!r}{by}): {e}") from e
    return root


# --- entry points ------------------------------------------------------------------------------

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


def analyze(model: nn.Module, example_inputs: Any) -> Program:
    """Capture ``model`` and return its Program; ``.dependency_groups`` lists the prunable groups."""
    return capture(model, example_inputs)
