"""Does a HuggingFace model's config describe its structure, and which config would?

``transformers`` rebuilds a saved model from ``config.json`` alone, then loads the weights into it:
``from_pretrained`` works only when ``type(model)(config)`` has exactly the model's tensors and
modules. After a rewrite (pruning shrinks heads and MLPs; DyT swaps norms) that is no longer true.

- :func:`structure_mismatches` builds ``type(model)(config)`` on the ``meta`` device (no memory) and
  lists every difference: tensor shapes, missing or extra tensors, module classes, numeric module
  attributes (head counts, scales). No difference means ``save_pretrained`` + ``from_pretrained``
  reproduces the model.
- :func:`fit_config` finds the config changes (head counts, intermediate sizes, ...) that make the
  config describe given tensor shapes, by a greedy search over the config's size fields, each
  candidate checked by building the model on ``meta``. No table of architectures: the search only
  knows the usual names of size fields, and the model's own constructor is the judge.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Config fields that set tensor sizes, by the names transformers' configs use.
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "n_embd", "n_inner", "n_head", "d_model", "d_ff", "d_kv", "num_heads", "ffn_dim", "encoder_ffn_dim",
    "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads", "hidden_dim", "n_heads", "dim",
    "num_kv_heads", "word_embed_proj_dim", "ffn_hidden_size", "kv_channels", "multi_query_group_num",
)
_SHOW = 5


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (it has a config and ``save_pretrained``)."""
    config = getattr(model, "config", None)
    return (config is not None and hasattr(config, "to_dict") and hasattr(type(model), "config_class")
            and callable(getattr(model, "save_pretrained", None)))


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer, by state-dict name."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def build_from_config(model: nn.Module, config: Any) -> nn.Module:
    """``type(model)(config)`` on the meta device (raises what the constructor raises)."""
    with torch.device("meta"):
        return type(model)(config)


def _shape_diffs(target: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> list[str]:
    out = [f"{k}: model has no such tensor in the config's model" for k in target if k not in got]
    out += [f"{k}: the config's model has it, the model does not" for k in got if k not in target]
    out += [f"{k}: {list(target[k])} vs the config's {list(got[k])}" for k in target
            if k in got and target[k] != got[k]]
    return out


def _numeric_attrs(module: nn.Module) -> dict[str, float]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def structure_mismatches(model: nn.Module, config: Any | None = None) -> list[str]:
    """What ``type(model)(config)`` (default: the model's own config) has different from ``model``.

    An empty list means the config describes the model: saving it with ``save_pretrained`` and
    loading with plain ``from_pretrained`` rebuilds the same structure.
    """
    config = model.config if config is None else config
    try:
        twin = build_from_config(model, config)
    except Exception as e:  # noqa: BLE001 - a config the constructor rejects describes nothing
        return [f"{type(model).__name__}(config) fails: {type(e).__name__}: {e}"]
    problems = _shape_diffs(tensor_shapes(model), tensor_shapes(twin))
    theirs = dict(twin.named_modules())
    for name, mine in model.named_modules():
        other = theirs.get(name)
        if other is None:
            continue
        if type(other) is not type(mine):
            problems.append(f"{name or '<root>'}: a {type(mine).__name__}, the config builds a {type(other).__name__}")
            continue
        a, b = _numeric_attrs(mine), _numeric_attrs(other)
        problems += [f"{name or '<root>'}.{k}: {a[k]} vs the config's {b[k]}" for k in sorted(a.keys() & b.keys())
                     if a[k] != b[k]]
    return problems


@dataclass
class ConfigFit:
    """The config changes that describe the target shapes (``changes``), or what is still off."""

    changes: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    trials: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.changes.items()) or "no change"


def _with(config: Any, changes: dict[str, int]) -> Any:
    new = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _candidates(value: Any, pairs: Iterable[tuple[int, int]]) -> set[int]:
    """Values to try for one size field, from the (config's size, wanted size) pairs still off."""
    out: set[int] = set()
    for have, want in pairs:
        if want <= 0:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if (value * want) % have == 0:
                out.add(value * want // have)  # the field scales that dim (heads x head_dim, units)
        elif value is None:
            out.add(want)  # a size derived when unset (GPT-2's n_inner): try the wanted size itself
    out.discard(value)
    return out


def fit_config(model: nn.Module, target: dict[str, tuple[int, ...]], config: Any | None = None, *,
               max_trials: int = 400) -> ConfigFit:
    """Search the config changes under which ``type(model)(config)`` has the ``target`` tensor shapes.

    Greedy: each round tries every size field of the config at the values that would fix a dim still
    off (builds on ``meta``), keeps the change that leaves the fewest differences, and stops when none
    are left or no change helps.
    """
    config = copy.deepcopy(model.config if config is None else config)
    fields = [f for f in SIZE_FIELDS if f in config.to_dict()]
    fit = ConfigFit()

    def diffs(changes: dict[str, int]) -> tuple[list[str], dict[str, tuple[int, ...]]] | None:
        fit.trials += 1
        try:
            shapes = tensor_shapes(build_from_config(model, _with(config, changes)))
        except Exception:  # noqa: BLE001 - the constructor rejects this combination
            return None
        return _shape_diffs(target, shapes), shapes

    first = diffs({})
    if first is None:
        fit.mismatches = [f"{type(model).__name__}(config) fails with the model's own config"]
        return fit
    problems, shapes = first
    while problems and fit.trials < max_trials:
        pairs = {(h, w) for k in target.keys() & shapes.keys() for h, w in zip(shapes[k], target[k])
                 if h != w and len(shapes[k]) == len(target[k])}
        best: tuple[int, dict[str, int], list[str], dict] | None = None
        for f in fields:
            current = fit.changes.get(f, getattr(config, f, None))
            for value in sorted(_candidates(current, pairs)):
                trial = {**fit.changes, f: value}
                result = diffs(trial)
                if result is not None and (best is None or len(result[0]) < best[0]):
                    best = (len(result[0]), trial, *result)
        if best is None or best[0] >= len(problems):
            break
        _, fit.changes, problems, shapes = best
    fit.mismatches = problems
    log.debug("config fit for %s: %s (%d trials, %d left)", type(model).__name__, fit.describe(), fit.trials,
              len(problems))
    return fit


def summarize(problems: list[str], show: int = _SHOW) -> str:
    """The first ``show`` problems, then a count of the rest."""
    head = "; ".join(problems[:show])
    return head + (f"; ... {len(problems) - show} more" if len(problems) > show else "")
