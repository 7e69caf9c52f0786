"""Load a saved model: replay its edit log on a fresh base model, then assign the weights.

The base model may be on the ``meta`` device; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..infra.program import Edit, EditError, replay_edits
from ..nn.spec import class_path
from .hf import check_save_pretrained
from .manifest_schema import check_attr_types, check_edit, layer_size_problems
from .saved_model import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SAVE_ID_KEY,
    SerializationError,
    config_dict,
    name_list,
    nonpersistent_buffers,
    split_fqn,
)

log = logging.getLogger(__name__)


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


def _check_same_save(manifest: dict[str, Any], weights: Path) -> None:
    """The weights file was written by the save that wrote the manifest (a failed save can leave one of each)."""
    want = manifest.get("save_id")
    if want is None:  # written before save ids (format 1 without one): nothing to compare
        return
    with safe_open(str(weights), framework="pt") as f:
        got = (f.metadata() or {}).get(SAVE_ID_KEY)
    if got is not None and got != want:  # (no id: written by another tool; the content checks decide)
        raise SerializationError(
            f"{weights} was not written by the save that wrote {weights.parent / MANIFEST_FILE} (save id "
            f"{got} vs {want}): a save was interrupted between the two files; save the model again")


def _edits_from(manifest: dict[str, Any], file: Path) -> list[Edit]:
    edits = []
    for i, d in enumerate(manifest["edits"]):
        if not (isinstance(d, dict) and isinstance(d.get("op"), str) and isinstance(d.get("target"), str)
                and isinstance(d.get("data", {}), dict)):
            raise SerializationError(f"{file} is corrupt: edit #{i} is not {{'op', 'target', 'data'}}: {d!r}")
        try:
            check_edit(i, d)
        except SerializationError as e:
            raise SerializationError(f"{file} is corrupt: {e}") from None
        edits.append(Edit.from_dict(d))
    return edits


def _config_hint(manifest: dict[str, Any], base: nn.Module) -> str:
    saved, given = manifest.get("base_config"), config_dict(base)
    if not saved or not given:
        return ""
    diff = [f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}"
            for k in sorted(saved.keys() | given.keys())
            if saved.get(k) != given.get(k) and not k.startswith("_") and k != "transformers_version"]
    return f"\nThe base model's config differs from the saved one: {name_list(diff)}" if diff else ""


def _target_device(model: nn.Module) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return str(t.device)
    return "cpu"


def _set_tensor_object(model: nn.Module, fqn: str, obj: torch.Tensor) -> None:
    owner_name, name = split_fqn(fqn)
    owner = model.get_submodule(owner_name)
    if isinstance(obj, nn.Parameter) and name in owner._parameters:
        owner._parameters[name] = obj
    elif not isinstance(obj, nn.Parameter) and name in owner._buffers:
        owner._buffers[name] = obj


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], strict: bool,
            hint: str, where: Path) -> None:
    aliases: dict[str, str] = manifest["aliases"]
    current = model.state_dict(keep_vars=True)
    model_np = nonpersistent_buffers(model)
    _check_names(aliases, manifest["nonpersistent_buffers"], tensors, current, model_np, where)
    full = {}
    for k in current:
        src = k if k in tensors else aliases.get(k)
        if src in tensors:
            full[k] = tensors[src]
    missing = [k for k in current if k not in full]
    unexpected = [k for k in tensors if k not in current and k not in model_np]
    mismatched = [f"{k} (file {list(full[k].shape)}, model {list(current[k].shape)})"
                  for k in full if full[k].shape != current[k].shape]
    mismatched += [f"{k} (file {_dtype(full[k])}, model {_dtype(current[k])}; build base_model in the saved "
                   f"dtype)" for k in full if full[k].shape == current[k].shape and full[k].dtype != current[k].dtype]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {name_list(names)}" for label, names in
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
        for k in [k for k in full if full[k].dtype != current[k].dtype]:
            full[k] = full[k].to(current[k].dtype)  # cast to what the rebuilt model holds
    model.load_state_dict(full, strict=False, assign=True)
    objects = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    for alias, canonical in aliases.items():  # re-tie: one Parameter object, as in the saved model
        if alias in current and canonical in objects:
            _set_tensor_object(model, alias, objects[canonical])
    for name in manifest["nonpersistent_buffers"]:
        if name in model_np and name in tensors:
            owner_name, attr = split_fqn(name)
            model.get_submodule(owner_name)._buffers[attr] = tensors[name]
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        msg = f"{len(still_meta)} tensor(s) are still on the meta device after loading: {name_list(still_meta)}"
        if strict:
            raise SerializationError(msg + f"; they are not in {where}")
        log.warning("%s", msg)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_names(aliases: dict[str, Any], np_names: list[Any], tensors: dict[str, torch.Tensor],
                 current: dict[str, torch.Tensor], model_np: dict[str, torch.Tensor], where: Path) -> None:
    """Aliases and non-persistent buffers in the manifest must name tensors that exist."""
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str) or canonical not in tensors:
            raise SerializationError(f"the manifest ties {alias!r} to {canonical!r}, which is not in {where}")
        if alias not in current:
            raise SerializationError(f"the manifest ties {alias!r} to {canonical!r}, but the rebuilt model has no "
                                     f"tensor {alias!r}")
    for name in np_names:
        if not isinstance(name, str) or name not in model_np:
            raise SerializationError(f"the manifest lists {name!r} as a non-persistent buffer, but the rebuilt model "
                                     f"has no such buffer")


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
    raw = manifest["edits"]
    try:
        replay_edits(model, edits, check=lambda i, _: check_attr_types(model, i, raw[i]))
    except EditError as e:
        raise SerializationError(f"cannot rebuild the model saved in {path}: {e}{hint}") from e
    try:
        _check_same_save(manifest, weights)
        tensors = load_file(str(weights), device=_target_device(model))
    except (SafetensorError, OSError) as e:
        raise SerializationError(f"cannot read {weights}: {e}; save the model again") from e
    _assign(model, tensors, manifest, strict, hint, weights)
    try:  # a file stores tensors contiguous: the layouts the log set come back once the weights are in
        replay_edits(model, [e for e in edits if e.op == "set_layout"])
    except EditError as e:
        raise SerializationError(f"cannot restore the tensor layouts saved in {path}: {e}") from e
    problems = layer_size_problems(model)
    if problems:
        msg = f"the model rebuilt from {manifest_file} is inconsistent: {name_list(problems)}"
        if strict:
            raise SerializationError(msg + "; the files were changed or damaged after saving: save the model again")
        log.warning("%s", msg)
    model.eval()
    check_save_pretrained(model)  # a rewritten HF model: save_pretrained refuses what transformers cannot load
    log.info("loaded %s with %d edits from %s", type(model).__name__, len(edits), path)
    return model
