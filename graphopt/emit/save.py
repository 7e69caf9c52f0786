"""Save an optimised model (or Program, or module): safetensors weights plus the JSON edit log."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..analysis.distributed import one_writer
from ..infra.program import Edit, EditError, Program, replay_edits
from ..nn.spec import class_path
from .saved_model import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SAVE_ID_KEY,
    SHOW,
    WEIGHTS_FILE,
    SerializationError,
    config_dict,
    meta_twin,
    name_list,
    nonpersistent_buffers,
    plain_json,
)

log = logging.getLogger(__name__)


# --- what is being saved ------------------------------------------------------------------------

def _unpack(obj: Any) -> tuple[nn.Module, nn.Module | None, list[Edit], str | None, Any]:
    """(model, base model or None, edits, pipeline text, report) of a result, Program or module."""
    program = getattr(obj, "program", None)
    if isinstance(program, Program) and hasattr(obj, "pipeline"):  # an OptimizeResult (it imports this module)
        return obj.model, program.original, list(program.edits), str(obj.pipeline), obj.report
    if isinstance(obj, Program):
        return obj.module, obj.original, list(obj.edits), None, None
    if isinstance(obj, nn.Module):
        return obj, None, [], None, None
    raise TypeError(f"save() takes an OptimizeResult, a Program or an nn.Module, got {type(obj).__name__}")


def compact_edits(edits: Iterable[Edit]) -> list[Edit]:
    """Drop edits made dead by a later ``replace_module`` of the same module or of an ancestor.

    An edit stays when a ``tie`` between it and the replacement links a tensor outside the
    replaced subtree to one inside it (the outside name keeps the tensor the edit made), and when a
    ``remove_items`` lies between them (module names before it may name other modules after it).
    """
    edits = list(edits)
    keep = [True] * len(edits)
    for j, later in enumerate(edits):
        if later.op != "replace_module":
            continue

        def inside(fqn: str, root: str = later.target) -> bool:
            return fqn == root or fqn.startswith(root + ".")

        last_tie_out = max((k for k in range(j) if edits[k].op == "tie"
                            and inside(str(edits[k].data.get("to", ""))) and not inside(edits[k].target)),
                           default=-1)
        renumbered = max((k for k in range(j) if edits[k].op == "remove_items"), default=-1)
        for i in range(max(last_tie_out, renumbered) + 1, j):
            if inside(edits[i].target):
                keep[i] = False
    return [e for e, k in zip(edits, keep) if k]


def _check_recordable(edits: list[Edit]) -> None:
    bad = [e for e in edits if e.op == "replace_module" and "unrecordable" in e.data]
    if bad:
        lines = [f"  pass {e.by or '<outside a pass>'!r} replaced {e.target!r}: {e.data['unrecordable']}"
                 for e in bad[:SHOW]]
        raise SerializationError(
            "cannot save: the edit log holds module replacements that cannot be written as JSON, so "
            "load() could not rebuild them:\n" + "\n".join(lines) +
            "\nGive each class a graphopt_spec(self) method returning its constructor kwargs, or call "
            "graphopt.register_module_spec(cls, fn), then run the pipeline again.")
    for i, e in enumerate(edits):
        try:
            json.dumps(e.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise SerializationError(
                f"cannot save: edit #{i} ({e.op} {e.target!r} by pass {e.by!r}) is not plain JSON: {err}; "
                f"its module spec (graphopt_spec / register_module_spec) must return JSON values") from None


def _check_replay(base: nn.Module, model: nn.Module, edits: list[Edit]) -> None:
    """Replay ``edits`` on a meta copy of ``base`` and check that it rebuilds ``model``'s structure."""
    twin = meta_twin(base)
    try:
        replay_edits(twin, edits)
    except EditError as e:
        raise SerializationError(f"cannot save: the edit log does not replay on the base model: {e}") from e
    problems = []
    want = {n: type(m) for n, m in model.named_modules(remove_duplicate=False)}
    got = {n: type(m) for n, m in twin.named_modules(remove_duplicate=False)}
    problems += [f"module {n!r} is a {want[n].__name__} but replays as "
                 f"{got[n].__name__ if n in got else 'nothing'}" for n in want if got.get(n) is not want[n]]
    problems += [f"module {n!r} replays but is not in the model" for n in got if n not in want]
    sd_want = {**model.state_dict(keep_vars=True), **nonpersistent_buffers(model)}
    sd_got = {**twin.state_dict(keep_vars=True), **nonpersistent_buffers(twin)}
    for k in sd_want.keys() | sd_got.keys():
        a, b = sd_want.get(k), sd_got.get(k)
        if a is None or b is None or a.shape != b.shape:
            fmt = lambda t: "missing" if t is None else list(t.shape)  # noqa: E731
            problems.append(f"tensor {k!r}: model {fmt(a)}, replayed {fmt(b)}")
    if problems:
        raise SerializationError(
            "cannot save: replaying the edit log on the base model does not rebuild this model, so a pass "
            "changed the model without going through the Program (use program.replace_module / set_tensor / "
            "resize / set_attr):\n  " + "\n  ".join(sorted(problems)[:SHOW])
            + (f"\n  ... {len(problems) - SHOW} more" if len(problems) > SHOW else ""))
    _warn_attr_drift(model, twin)


_SCALARS = (bool, int, float, str, type(None))


def _warn_attr_drift(model: nn.Module, twin: nn.Module) -> None:
    twins = dict(twin.named_modules(remove_duplicate=False))
    drift = []
    for name, mod in model.named_modules(remove_duplicate=False):
        other = twins[name]
        for attr, value in vars(mod).items():
            if attr.startswith("_") or attr == "training" or not isinstance(value, _SCALARS):
                continue
            if attr in vars(other) and vars(other)[attr] != value and value == value:  # NaN never equals
                drift.append(f"{name or '<root>'}.{attr}: model {value!r}, replayed {vars(other)[attr]!r}")
    if drift:
        log.warning("attributes differ between the model and its replayed edit log (set them with "
                    "program.set_attr so that load() restores them): %s", name_list(drift))


# --- tensors ------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def tensors_to_write(model: nn.Module, exclude: tuple[str, ...] = ()
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors to write, aliases {name: stored name}, names of non-persistent buffers), leaving out the
    tensors of the submodules named in ``exclude`` (a streamed run writes its blocks on their own)."""
    named = dict(model.state_dict(keep_vars=True))
    nonpersistent = nonpersistent_buffers(model)
    named.update({k: v for k, v in nonpersistent.items() if k not in named})
    if exclude:
        inside = tuple(f"{e}." for e in exclude)
        named = {k: v for k, v in named.items() if not k.startswith(inside)}
        nonpersistent = {k: v for k, v in nonpersistent.items() if not k.startswith(inside)}
    meta = [k for k, t in named.items() if t.is_meta]
    if meta:
        raise SerializationError(
            f"cannot save: {len(meta)} tensor(s) are on the meta device ({name_list(meta)}); materialise real "
            f"weights first (e.g. model.to_empty(device='cpu') and load a checkpoint)")
    sparse = [k for k, t in named.items() if t.layout != torch.strided]
    if sparse:
        raise SerializationError(f"cannot save non-dense tensors ({name_list(sparse)}); convert them with .to_dense()")
    canonical: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        view = (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in canonical:
            aliases[name] = canonical[view]
            continue
        canonical.setdefault(view, name)
        out[name] = t.detach()
    by_storage: dict[tuple, list[str]] = {}
    for name, t in out.items():
        if t.numel():
            by_storage.setdefault(_storage_key(t), []).append(name)
    shared = {n for names in by_storage.values() if len(names) > 1 for n in names}
    for name, t in out.items():  # safetensors wants contiguous tensors that own their bytes
        if name in shared or not t.is_contiguous():
            t = t.contiguous() if name not in shared else t.clone(memory_format=torch.contiguous_format)
        out[name] = t.to("cpu")
    return out, aliases, sorted(nonpersistent)


def _report_summary(report: Any) -> list[dict[str, Any]] | None:
    if report is None:
        return None
    return [plain_json({"pass": r.text or r.name, "status": r.status, "params": r.params, "flops": r.flops,
                         "latency_ms": r.latency_ms, "max_abs_err": r.max_abs_err, "max_rel_err": r.max_rel_err,
                         "stats": r.stats, "reason": r.reason}) for r in report.records]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- save ---------------------------------------------------------------------------------------

def save(obj: Any, directory: str | Path) -> Path:
    """Write ``obj``'s weights (``model.safetensors``) and edit log (``graphopt.json``) to ``directory``.

    ``obj`` is an :class:`~graphopt.OptimizeResult`, a :class:`~graphopt.Program` or a plain
    ``nn.Module``. Everything is checked before anything is written: every edit must be
    recordable as JSON, and (when the base model is known) replaying the log on it must rebuild
    this model's structure. Returns the directory.
    """
    model, base, edits, pipeline, report = _unpack(obj)
    edits = checked_edits(model, base, edits)
    tensors, aliases, nonpersistent = tensors_to_write(model)
    save_id = uuid.uuid4().hex  # in both files: load() refuses weights and a manifest of different saves
    text = manifest_text(model, base, edits, pipeline, report, aliases, nonpersistent, save_id)
    out = commit(directory, lambda p: save_file(tensors, str(p), metadata=weights_metadata(save_id)), text)
    log.info("saved %s (%d tensors, %d edits) to %s", type(model).__name__, len(tensors), len(edits), out)
    return out


def checked_edits(model: nn.Module, base: nn.Module | None, edits: Iterable[Edit]) -> list[Edit]:
    """The edit log to write (compacted), once it is recordable and replays on ``base`` into ``model``."""
    if base is not None and type(base) is not type(model):
        raise SerializationError(
            f"cannot save: the model is a {class_path(type(model))} but its base model is a "
            f"{class_path(type(base))}; a pass rewrote the root module (e.g. as a graph), which load() cannot "
            f"replay on a base model. Export it with export_onnx instead")
    edits = compact_edits(edits)
    _check_recordable(edits)
    if base is not None and base is not model:
        _check_replay(base, model, edits)
    return edits


def weights_metadata(save_id: str) -> dict[str, str]:
    """The safetensors metadata of a save's weights file."""
    return {"format": "pt", "graphopt": str(FORMAT_VERSION), SAVE_ID_KEY: save_id}


def manifest_text(model: nn.Module, base: nn.Module | None, edits: list[Edit], pipeline: str | None, report: Any,
                  aliases: dict[str, str], nonpersistent: list[str], save_id: str) -> str:
    """``graphopt.json``: the base model, the edit log and what ``load`` needs to put the weights back."""
    from ..version import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphopt_version": __version__,
        "torch_version": torch.__version__,
        "base_class": class_path(type(base if base is not None else model)),
        "base_config": config_dict(base if base is not None else model),
        "pipeline": pipeline,
        "report": _report_summary(report),
        "weights": WEIGHTS_FILE,
        "save_id": save_id,
        "aliases": aliases,
        "nonpersistent_buffers": nonpersistent,
        "edits": [e.to_dict() for e in edits],
    }
    return json.dumps(manifest, indent=2, allow_nan=False)


def commit(directory: str | Path, write_weights: Callable[[Path], None], text: str) -> Path:
    """Write the weights (``write_weights(path)``), then the manifest ``text``, each replaced atomically."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise SerializationError(f"cannot save to {out}: it is a file, not a directory")
    with one_writer() as writes:  # (under torchrun: rank 0 writes, the others wait for it)
        if writes:
            out.mkdir(parents=True, exist_ok=True)
            # Each file is replaced atomically, the weights first; the manifest is the commit point. A save that
            # fails between the two leaves new weights beside the old manifest, which load() refuses (save_id).
            _write_atomic(out / WEIGHTS_FILE, write_weights)
            _write_atomic(out / MANIFEST_FILE, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return out
