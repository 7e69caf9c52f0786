"""Quantized HuggingFace checkpoints in the compressed-tensors format (loaded by transformers and vLLM).

:func:`save_compressed` writes ``save_pretrained``'s directory for a model whose Linear layers are
graphopt :class:`QuantLinear` layers: ``config.json`` gains a ``quantization_config`` with
``quant_method: "compressed-tensors"``, one config group per (bits, group size), each layer named in
its group's ``targets``, and the float layers in ``ignore``. Per quantized layer the weights are
stored as the format wants them (compressed-tensors 0.20, pinned in ``constraints.txt``):

- int4 and ternary (2 bits): ``pack-quantized``: ``weight_packed`` int32 ``[out, in * bits / 32]``
  (code + 2^(bits-1) at bit ``bits * (i % (32 / bits))`` of word ``i // (32 / bits)``),
  ``weight_scale`` ``[out, groups]`` and ``weight_shape``.
- int8: ``int-quantized``: ``weight`` int8 ``[out, in]`` and ``weight_scale`` ``[out, 1]`` (or groups).
- w8a8 with per-token activations (``quantize(scheme=w8a8,activations=per_token)``): int8 weights as above and
  ``input_activations`` dynamic, symmetric, per token (graphopt rounds activations with the format's
  convention, ``scale = max|x_row| / 127.5``).

Dequantizing is ``code * scale`` in both, so ``AutoModel.from_pretrained(directory)`` (with the
``compressed-tensors`` package, without graphopt) computes what graphopt's quantized model does.
What the format cannot hold is refused with the reason: w8a8 layers with SmoothQuant factors or
onnxruntime-style per-tensor activations,
groups that do not divide a layer, packed embedding tables, GPT-2's ``Conv1D`` layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.hf_config import is_hf_model, structure_mismatches
from ..infra.program import swapped_modules
from ..nn.quant import BITS, PackedLayer, QuantConv2d, QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

#: The compressed-tensors version this writer is tested against (constraints.txt pins it).
TESTED_VERSION = "0.20.1"


def compressed_tensors_problems(model: nn.Module) -> list[str]:
    """Why ``model`` cannot be written as a compressed-tensors checkpoint (``[]``: it can)."""
    if not is_hf_model(model):
        return [f"{type(model).__name__} is not a HuggingFace PreTrainedModel"]
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            problems.append(f"{name}: packed embedding tables have no compressed-tensors form here (quantize "
                            "without embeddings=true, and without lm_head=true where the head is tied to the "
                            "table; or save with graphopt.save)")
        if isinstance(m, QuantConv2d):
            problems.append(f"{name}: quantized convolutions have no compressed-tensors form here (it writes "
                            "Linear layers; keep convolutions in float with quantize(skip=[...]), or save with "
                            "graphopt.save / export to ONNX)")
        if not isinstance(m, QuantLinear):
            continue
        if m.smooth is not None:
            problems.append(f"{name}: w8a8 with SmoothQuant factors (the format has no per-input-channel "
                            "factor; export it to ONNX instead)")
        elif m.activations == "per_tensor":
            problems.append(f"{name}: w8a8 with ONNX-style activations (uint8, one scale and zero point per "
                            "tensor) has no compressed-tensors form; quantize with activations=per_token,alpha=0 "
                            "(per-token int8 activations, which the format has), or export it to ONNX")
        if m.group_size > 0 and m.in_features % m.group_size:
            problems.append(f"{name}: group size {m.group_size} does not divide its {m.in_features} inputs")
    kinds = _config_modules(model)
    with float_layers(model, kinds):  # what from_pretrained would build in place of each packed layer
        problems += structure_mismatches(model, attributes=False)
    problems += [f"{n}: a transformers Conv1D layer (compressed-tensors quantizes nn.Linear only)"
                 for n, m in model.named_modules() if isinstance(m, QuantLinear) and kinds.get(n) == "Conv1D"]
    return problems


@contextlib.contextmanager
def float_layers(model: nn.Module, kinds: dict[str, str]) -> Iterator[None]:
    """Inside: each QuantLinear / QuantEmbedding of ``model`` is the float layer its config builds there
    (``kinds``: class names by module name), its weight on the meta device (nothing is copied);
    afterwards the packed layers are back."""
    from transformers.pytorch_utils import Conv1D

    swaps: dict[str, nn.Module] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, (QuantLinear, QuantEmbedding)):
            continue
        with torch.device("meta"):
            if isinstance(m, QuantEmbedding):
                layer: nn.Module = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx)
            elif kinds.get(name) == "Conv1D":  # transformers' Conv1D keeps [in, out]
                layer = Conv1D(m.out_features, m.in_features)
            else:
                layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        layer.to(m.scale.dtype)
        if getattr(m, "bias", None) is not None:
            layer.bias = m.bias  # the real bias: it is saved as it is
        swaps[name] = layer
    with swapped_modules(model, swaps):
        yield


def _config_modules(model: nn.Module) -> dict[str, str]:
    """Class names of the modules the model's config builds (on the meta device)."""
    from ..analysis.hf_config import build_from_config

    try:
        twin = build_from_config(model, model.config)
    except Exception:  # noqa: BLE001 - reported by loadability_problems
        return {}
    return {n: type(m).__name__ for n, m in twin.named_modules()}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[rows, cols]`` (int8, signed) -> int32 words, ``32 // bits`` codes per word, low bits first."""
    per = 32 // bits
    rows, cols = codes.shape
    values = torch.nn.functional.pad(codes.to(torch.int64) + (1 << (bits - 1)), (0, (-cols) % per))
    values = values.reshape(rows, -1, per)
    words = torch.zeros(values.shape[:2], dtype=torch.int64)
    for i in range(per):
        words |= values[..., i] << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as signed int32


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``model``'s QuantLinear layers."""
    groups: dict[tuple[str, int, str], list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            groups.setdefault((m.scheme, m.group_size, m.activations), []).append(name)
    config_groups = {}
    for i, ((scheme, group, activations), names) in enumerate(sorted(groups.items())):
        weights = {"num_bits": BITS[scheme], "type": "int", "symmetric": True, "dynamic": False,
                   "strategy": "group" if group > 0 else "channel", "group_size": group if group > 0 else None,
                   "actorder": None, "observer": "minmax"}
        inputs = None if activations == "none" else {  # per_token: dynamic symmetric int8 per token
            "num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
            "group_size": None, "actorder": None, "observer": None}
        config_groups[f"group_{i}"] = {"targets": names, "weights": weights, "input_activations": inputs,
                                       "output_activations": None,
                                       "format": "int-quantized" if scheme == "int8" else "pack-quantized"}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    formats = {g["format"] for g in config_groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "config_groups": config_groups, "ignore": ignore, "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "version": TESTED_VERSION}


def compressed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each quantized layer's tensors in their compressed-tensors form."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        for key in ("qweight", "scale", "smooth"):
            state.pop(f"{name}.{key}", None)
        codes = m.codes()
        state[f"{name}.weight_scale"] = m.scale.detach().clone()
        if m.scheme == "int8":
            state[f"{name}.weight"] = codes.clone()
        else:
            state[f"{name}.weight_packed"] = pack_int32(codes, BITS[m.scheme])
            state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
    return state


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLayer) for m in model.modules())


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (with QuantLinear layers) as a compressed-tensors checkpoint into ``directory``.

    Call :func:`compressed_tensors_problems` first (``graphopt.emit.hf.save_pretrained`` does).
    """
    path = Path(directory)
    state = compressed_state_dict(model)
    # Written whole into a sibling folder first, then moved in with config.json last: a failure on the way
    # (transformers' writer, the config rewrite) leaves the directory as it was, never weights whose config
    # lacks its quantization_config (a float model with freshly initialised layers to whoever loads it).
    path.parent.mkdir(parents=True, exist_ok=True)  # the staging folder sits beside it: moves stay on one disk
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with float_layers(model, _config_modules(model)):
            type(model).save_pretrained(model, staging, state_dict=state)
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = quantization_config(model)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        path.mkdir(parents=True, exist_ok=True)
        for item in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(item, path / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s as a compressed-tensors checkpoint to %s", type(model).__name__, path)
    return path
