"""Save an optimised model as safetensors weights plus a JSON edit log; load it onto a fresh base model.

A saved directory holds two files and nothing that is ever unpickled:

* ``model.safetensors``: every tensor of the model. Tied tensors are stored once (the JSON maps
  the other names to it) and non-persistent buffers are stored too, so a base model built on the
  ``meta`` device comes back with real values everywhere.
* ``graphopt.json``: format version, the base model's class (and HF config), the pipeline and a
  report summary, the tensor aliases, and the Program's edit log.

:func:`load` replays the edit log on the caller's freshly built base model with
:func:`graphopt.program.replay_edits`, then assigns the weights to the result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .module_spec import class_path
from .program import Edit, EditError, Program, replay_edits

log = logging.getLogger(__name__)

FORMAT = "graphopt.saved_model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "graphopt.json"
_SHOW = 5  # how many names an error message lists


class SerializationError(ValueError):
    """A model cannot be saved, or a saved directory does not fit the base model it is loaded onto."""


# --- helpers ------------------------------------------------------------------------------------

def _names(items: Iterable[str], n: int = _SHOW) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _plain_json(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become None, unknown objects their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    return str(value)


def _split(fqn: str) -> tuple[str, str]:
    owner, _, name = fqn.rpartition(".")
    return owner, name


def _nonpersistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name in mod._non_persistent_buffers_set:
            value = mod._buffers.get(name)
            if value is not None:
                out[f"{prefix}.{name}" if prefix else name] = value
    return out


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    try:
        return _plain_json(json.loads(config.to_json_string(use_diff=False)))
    except (TypeError, ValueError) as e:
        log.debug("could not record the config of %s: %s", type(model).__name__, e)
        return None


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on ``meta`` (no memory, ties kept)."""
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for _, b in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return copy.deepcopy(model, memo)


# --- what is being saved ------------------------------------------------------------------------

def _unpack(obj: Any) -> tuple[nn.Module, nn.Module | None, list[Edit], str | None, Any]:
    """(model, base model or None, edits, pipeline text, report) of a result, Program or module."""
    from .optimize import OptimizeResult

    if isinstance(obj, OptimizeResult):
        return obj.model, obj.program.original, list(obj.program.edits), str(obj.pipeline), obj.report
    if isinstance(obj, Program):
        return obj.module, obj.original, list(obj.edits), None, None
    if isinstance(obj, nn.Module):
        return obj, None, [], None, None
    raise TypeError(f"save() takes an OptimizeResult, a Program or an nn.Module, got {type(obj).__name__}")


def compact_edits(edits: Iterable[Edit]) -> list[Edit]:
    """Drop edits made dead by a later ``replace_module`` of the same module or of an ancestor.

    An edit stays when a ``tie`` between it and the replacement links a tensor outside the
    replaced subtree to one inside it (the outside name keeps the tensor the edit made).
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
        for i in range(last_tie_out + 1, j):
            if inside(edits[i].target):
                keep[i] = False
    return [e for e, k in zip(edits, keep) if k]


def _check_recordable(edits: list[Edit]) -> None:
    bad = [e for e in edits if e.op == "replace_module" and "unrecordable" in e.data]
    if bad:
        lines = [f"  pass {e.by or '<outside a pass>'!r} replaced {e.target!r}: {e.data['unrecordable']}"
                 for e in bad[:_SHOW]]
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
    twin = _meta_twin(base)
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
    sd_want = {**model.state_dict(keep_vars=True), **_nonpersistent_buffers(model)}
    sd_got = {**twin.state_dict(keep_vars=True), **_nonpersistent_buffers(twin)}
    for k in sd_want.keys() | sd_got.keys():
        a, b = sd_want.get(k), sd_got.get(k)
        if a is None or b is None or a.shape != b.shape:
            fmt = lambda t: "missing" if t is None else list(t.shape)  # noqa: E731
            problems.append(f"tensor {k!r}: model {fmt(a)}, replayed {fmt(b)}")
    if problems:
        raise SerializationError(
            "cannot save: replaying the edit log on the base model does not rebuild this model, so a pass "
            "changed the model without going through the Program (use program.replace_module / set_tensor / "
            "resize / set_attr):\n  " + "\n  ".join(sorted(problems)[:_SHOW])
            + (f"\n  ... {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""))
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
                    "program.set_attr so that load() restores them): %s", _names(drift))


# --- tensors ------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _tensors_to_write(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors to write, aliases {name: stored name}, names of non-persistent buffers)."""
    named = dict(model.state_dict(keep_vars=True))
    nonpersistent = _nonpersistent_buffers(model)
    named.update({k: v for k, v in nonpersistent.items() if k not in named})
    meta = [k for k, t in named.items() if t.is_meta]
    if meta:
        raise SerializationError(
            f"cannot save: {len(meta)} tensor(s) are on the meta device ({_names(meta)}); materialise real "
            f"weights first (e.g. model.to_empty(device='cpu') and load a checkpoint)")
    sparse = [k for k, t in named.items() if t.layout != torch.strided]
    if sparse:
        raise SerializationError(f"cannot save non-dense tensors ({_names(sparse)}); convert them with .to_dense()")
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
    return [_plain_json({"pass": r.text or r.name, "status": r.status, "params": r.params, "flops": r.flops,
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
    if base is not None and type(base) is not type(model):
        raise SerializationError(
            f"cannot save: the model is a {class_path(type(model))} but its base model is a "
            f"{class_path(type(base))}; a pass rewrote the root module (e.g. as a graph), which load() cannot "
            f"replay on a base model. Export it with export_onnx instead")
    edits = compact_edits(edits)
    _check_recordable(edits)
    if base is not None and base is not model:
        _check_replay(base, model, edits)
    tensors, aliases, nonpersistent = _tensors_to_write(model)
    from . import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphopt_version": __version__,
        "torch_version": torch.__version__,
        "base_class": class_path(type(base if base is not None else model)),
        "base_config": _config_dict(base if base is not None else model),
        "pipeline": pipeline,
        "report": _report_summary(report),
        "weights": WEIGHTS_FILE,
        "aliases": aliases,
        "nonpersistent_buffers": nonpersistent,
        "edits": [e.to_dict() for e in edits],
    }
    text = json.dumps(manifest, indent=2, allow_nan=False)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise SerializationError(f"cannot save to {out}: it is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / WEIGHTS_FILE,
                  lambda p: save_file(tensors, str(p), metadata={"format": "pt", "graphopt": str(FORMAT_VERSION)}))
    _write_atomic(out / MANIFEST_FILE, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    log.info("saved %s (%d tensors, %d edits) to %s", type(model).__name__, len(tensors), len(edits), out)
    return out


# --- load ---------------------------------------------------------------------------------------

def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``graphopt.json`` in ``directory`` (what :func:`save` wrote)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved graphopt model at {path}: the directory does not exist")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} was not written by graphopt.save (or is incomplete)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SerializationError(f"{file} is not valid JSON ({e}); save the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SerializationError(f"{file} is not a graphopt saved-model manifest (no format={FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SerializationError(f"{file} has format version {version!r}; this graphopt reads up to "
                                 f"{FORMAT_VERSION}: upgrade graphopt")
    checks = {"base_class": str, "weights": str, "edits": list, "aliases": dict, "nonpersistent_buffers": list}
    for key, tp in checks.items():
        if not isinstance(manifest.get(key), tp):
            raise SerializationError(f"{file} is corrupt: {key!r} should be a {tp.__name__}")
    if Path(manifest["weights"]).name != manifest["weights"]:
        raise SerializationError(f"{file} is corrupt: weights must name a file inside {path}")
    return manifest


def _edits_from(manifest: dict[str, Any], file: Path) -> list[Edit]:
    edits = []
    for i, d in enumerate(manifest["edits"]):
        if not (isinstance(d, dict) and isinstance(d.get("op"), str) and isinstance(d.get("target"), str)
                and isinstance(d.get("data", {}), dict)):
            raise SerializationError(f"{file} is corrupt: edit #{i} is not {{'op', 'target', 'data'}}: {d!r}")
        edits.append(Edit.from_dict(d))
    return edits


def _config_hint(manifest: dict[str, Any], base: nn.Module) -> str:
    saved, given = manifest.get("base_config"), _config_dict(base)
    if not saved or not given:
        return ""
    diff = [f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}"
            for k in sorted(saved.keys() | given.keys())
            if saved.get(k) != given.get(k) and not k.startswith("_") and k != "transformers_version"]
    return f"\nThe base model's config differs from the saved one: {_names(diff)}" if diff else ""


def _target_device(model: nn.Module) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return str(t.device)
    return "cpu"


def _set_tensor_object(model: nn.Module, fqn: str, obj: torch.Tensor) -> None:
    owner_name, name = _split(fqn)
    owner = model.get_submodule(owner_name)
    if isinstance(obj, nn.Parameter) and name in owner._parameters:
        owner._parameters[name] = obj
    elif not isinstance(obj, nn.Parameter) and name in owner._buffers:
        owner._buffers[name] = obj


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], strict: bool,
            hint: str, where: Path) -> None:
    aliases: dict[str, str] = manifest["aliases"]
    current = model.state_dict(keep_vars=True)
    model_np = _nonpersistent_buffers(model)
    full = {}
    for k in current:
        src = k if k in tensors else aliases.get(k)
        if src in tensors:
            full[k] = tensors[src]
    missing = [k for k in current if k not in full]
    unexpected = [k for k in tensors if k not in current and k not in model_np]
    mismatched = [f"{k} (file {list(full[k].shape)}, model {list(current[k].shape)})"
                  for k in full if full[k].shape != current[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {_names(names)}" for label, names in
                 (("missing from the file", missing), ("not in the model", unexpected),
                  ("shape mismatch", mismatched)) if names]
        msg = (f"the weights in {where} do not match the model rebuilt from the edit log — "
               + "; ".join(parts) + hint)
        if strict:
            raise SerializationError(msg + "\nBuild base_model exactly as the saved model's base "
                                           "(or pass strict=False to load what fits)")
        log.warning("%s", msg)
        for k in [k for k in full if full[k].shape != current[k].shape]:
            del full[k]
    model.load_state_dict(full, strict=False, assign=True)
    objects = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    for alias, canonical in aliases.items():  # re-tie: one Parameter object, as in the saved model
        if alias in current and canonical in objects:
            _set_tensor_object(model, alias, objects[canonical])
    for name in manifest["nonpersistent_buffers"]:
        if name in model_np and name in tensors:
            owner_name, attr = _split(name)
            model.get_submodule(owner_name)._buffers[attr] = tensors[name]
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        msg = f"{len(still_meta)} tensor(s) are still on the meta device after loading: {_names(still_meta)}"
        if strict:
            raise SerializationError(msg + f"; they are not in {where}")
        log.warning("%s", msg)


def load(directory: str | Path, base_model: nn.Module, *, strict: bool = True, inplace: bool = False) -> nn.Module:
    """Rebuild a saved model: replay its edit log on ``base_model``, load the weights, return it in eval mode.

    Args:
        directory: what :func:`save` wrote.
        base_model: a freshly built model of the saved base class and config; its weights do not
            matter and may be on the ``meta`` device (then the result has real weights on the CPU).
        strict: raise on a base class or weights that do not match; ``False`` warns and loads what fits.
        inplace: edit ``base_model`` itself instead of a copy (saves memory for large real models;
            a meta-device base model is copied for free).
    """
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"load() needs base_model, a freshly built nn.Module, got {type(base_model).__name__}")
    path = Path(directory)
    manifest = read_manifest(path)
    manifest_file = path / MANIFEST_FILE
    weights = path / manifest["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the weights of the model saved in {path} are missing")
    edits = _edits_from(manifest, manifest_file)
    given, expected = class_path(type(base_model)), manifest["base_class"]
    if given != expected:
        msg = (f"{path} was saved from a {expected} base model but base_model is a {given}; "
               f"build a {expected.rpartition('.')[2]} (same config as when it was optimised) and pass that")
        if strict:
            raise SerializationError(msg)
        log.warning("%s", msg)
    hint = _config_hint(manifest, base_model)
    model = base_model if inplace else copy.deepcopy(base_model)
    try:
        replay_edits(model, edits)
    except EditError as e:
        raise SerializationError(f"cannot rebuild the model saved in {path}: {e}{hint}") from e
    try:
        tensors = load_file(str(weights), device=_target_device(model))
    except (SafetensorError, OSError) as e:
        raise SerializationError(f"cannot read {weights}: {e}; save the model again") from e
    _assign(model, tensors, manifest, strict, hint, weights)
    model.eval()
    log.info("loaded %s with %d edits from %s", type(model).__name__, len(edits), path)
    return model
