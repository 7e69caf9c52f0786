"""HuggingFace checkpoints: ``save_pretrained`` that never writes a directory transformers cannot load.

A rewritten HF model keeps its class, so ``save_pretrained`` and ``from_pretrained`` work as long as
its config describes it (passes keep the config in step: ``set_config`` edits). When the config
cannot (per-layer sizes, DyT in place of LayerNorm), plain transformers would build the wrong model
from ``config.json`` and fail, or worse load part of the weights. :func:`check_save_pretrained`
makes the model's ``save_pretrained`` refuse with the reason and the way out instead.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.distributed import one_writer
from ..analysis.hf_config import is_hf_model, structure_mismatches, summarize
from .compressed_tensors import compressed_tensors_problems, is_quantized, save_compressed

log = logging.getLogger(__name__)


class NotLoadableError(ValueError):
    """``save_pretrained`` was refused: the config cannot describe the model (the message says what to do)."""


def loadability_problems(model: nn.Module) -> list[str]:
    """Why ``from_pretrained`` could not rebuild ``model`` from its config (tensors and module classes).

    A quantized model is written as a compressed-tensors checkpoint: what that format cannot hold counts.
    """
    if not is_hf_model(model):
        return [f"{type(model).__name__} is not a HuggingFace PreTrainedModel"]
    if is_quantized(model):
        return compressed_tensors_problems(model)
    return structure_mismatches(model, attributes=False)


def refusal(model: nn.Module, problems: list[str]) -> str:
    if is_quantized(model):
        return (f"{type(model).__name__}.save_pretrained refused: the compressed-tensors format cannot hold this "
                f"quantized model ({summarize(problems, 2)}). Save with go.save(result, directory) (graphopt's own "
                "format keeps every layer), or export it to ONNX")
    return (f"{type(model).__name__}.save_pretrained refused: its config cannot describe the rewritten model, so "
            f"transformers could not load the directory ({summarize(problems, 1)}). Save with "
            "go.save(result, directory) and load with go.load(directory, base_model); or, for pruning, use "
            "prune(reloadable=true) (the same sizes in every layer, only what the config can describe). DyT and "
            "other graphopt modules have no transformers equivalent. To write it anyway: "
            "type(model).save_pretrained(model, directory).")


def save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    """The model's own ``save_pretrained``, after checking that plain transformers can load what it writes;
    a quantized model is written as a compressed-tensors checkpoint (:mod:`.compressed_tensors`). Under
    ``torchrun``, rank 0 writes and the other processes wait for it."""
    problems = loadability_problems(self)
    if problems:
        raise NotLoadableError(refusal(self, problems))
    if is_quantized(self) and (args or kwargs):
        raise TypeError("save_pretrained of a quantized model takes only the directory (it writes the "
                        "compressed-tensors format)")
    with one_writer() as writes:  # (under torchrun: rank 0 writes, the others wait for it)
        if not writes:
            return None
        if is_quantized(self):
            return save_compressed(self, save_directory)
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def check_save_pretrained(model: nn.Module) -> list[str]:
    """Route ``model.save_pretrained`` through the check above; return the problems found now (``[]``: loadable).

    Only this instance changes (its class and every other model are untouched); a deep copy keeps the
    check.
    """
    if not is_hf_model(model):
        return []
    model.save_pretrained = types.MethodType(save_pretrained, model)
    return loadability_problems(model)


def write_pretrained(model: nn.Module, directory: str | Path, tokenizer: Any | None = None) -> Path:
    """``save_pretrained`` (config, weights) and the tokenizer's files into ``directory``."""
    path = Path(directory)
    save_pretrained(model, path)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    log.info("wrote %s for from_pretrained to %s", type(model).__name__, path)
    return path
