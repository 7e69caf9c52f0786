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

from ..frontend.inputs import as_example_inputs, compare_outputs

log = logging.getLogger(__name__)

#: Config fields that set tensor sizes, by the names transformers' configs use. Per-head sizes
#: (``head_dim``, ``d_kv``, ``kv_channels``) are not searched: graphopt's pruning keeps heads whole.
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_embd", "n_inner",
    "n_head", "d_model", "d_ff", "num_heads", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
    "encoder_attention_heads", "decoder_attention_heads", "hidden_dim", "n_heads", "dim", "num_kv_heads",
    "word_embed_proj_dim", "ffn_hidden_size", "multi_query_group_num",
)
_SHOW = 5
#: Dropout layers: the identity in eval mode, so ``remove_dropout``'s ``nn.Identity`` in their place reloads
#: as the config's Dropout and computes the same (the config still describes the model)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (it has a config and ``save_pretrained``)."""
    config = getattr(model, "config", None)
    return (config is not None and hasattr(config, "to_dict") and hasattr(type(model), "config_class")
            and callable(getattr(model, "save_pretrained", None)))


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer, by state-dict name."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def validate_config(config: Any) -> None:
    """Run the config's own checks where it has them (``config.validate()``, transformers >= 5.25), as
    ``save_pretrained`` will; raises ``ValueError`` with the config's reason."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - each transformers version raises its own class
        cause = e.__cause__ or e
        raise ValueError(f"the config does not validate: {str(cause).strip().splitlines()[-1]}") from e


def build_from_config(model: nn.Module, config: Any) -> nn.Module:
    """``type(model)(config)`` on the meta device, for a config that validates (raises what either raises)."""
    validate_config(config)
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


def numeric_attrs(model: nn.Module) -> dict[str, float]:
    """Every numeric module attribute, as ``{"module.attr": value}`` (to see which ones a rewrite changed)."""
    return {f"{name}.{k}" if name else k: v for name, m in model.named_modules() for k, v in _numeric_attrs(m).items()}


def _module_diffs(model: nn.Module, twin: nn.Module, attributes: bool = True) -> list[str]:
    problems = []
    theirs = dict(twin.named_modules())
    for name, mine in model.named_modules():
        other = theirs.get(name)
        if other is None:
            continue
        if type(mine) is nn.Identity and isinstance(other, DROPOUTS):
            continue
        if type(other) is not type(mine):
            problems.append(f"{name or '<root>'}: {type(mine).__name__} in the model, "
                            f"{type(other).__name__} in the config's")
            continue
        if not attributes:
            continue
        a, b = _numeric_attrs(mine), _numeric_attrs(other)
        problems += [f"{name or '<root>'}.{k}: {a[k]} vs the config's {b[k]}" for k in sorted(a.keys() & b.keys())
                     if a[k] != b[k]]
    return problems


def structure_mismatches(model: nn.Module, config: Any | None = None, *, attributes: bool = True) -> list[str]:
    """What ``type(model)(config)`` (default: the model's own config) has different from ``model``.

    Tensor names and shapes, module classes, and (``attributes=True``) numeric module attributes,
    some of which are stale copies that no forward reads. An empty list means the config describes
    the model: ``save_pretrained`` + plain ``from_pretrained`` rebuild the same structure.
    """
    config = model.config if config is None else config
    try:
        twin = build_from_config(model, config)
    except Exception as e:  # noqa: BLE001 - a config the constructor rejects describes nothing
        return [f"{type(model).__name__}(config) fails: {type(e).__name__}: {e}"]
    return _shape_diffs(tensor_shapes(model), tensor_shapes(twin)) + _module_diffs(model, twin, attributes=attributes)


@dataclass
class ConfigFit:
    """The config changes that describe the target shapes (``changes``), or what is still off."""

    changes: dict[str, Any] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    trials: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.changes.items()) or "no change"


def with_changes(config: Any, changes: dict[str, int]) -> Any:
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


def fit_config(model: nn.Module, target: dict[str, tuple[int, ...]] | None = None, config: Any | None = None, *,
               changed_attrs: set[str] | None = None, seeds: Iterable[dict[str, Any]] = (), search: bool = True,
               max_trials: int = 400) -> ConfigFit:
    """Search the config changes under which ``type(model)(config)`` has the ``target`` tensor shapes.

    The one config search of graphopt: width changes (``prune``) search the size fields; depth changes
    give ``seeds``, the change sets to start from (each field that may hold the layer count set to the new
    count, per-layer lists shortened), and ``search=False`` when no size field should move.

    ``target=None`` fits the model as it is (its tensor shapes). ``changed_attrs`` names module
    attributes a rewrite changed (``"layers.0.attn.num_heads"``, see :func:`numeric_attrs`); the
    config's model must agree on those too, which tells 2 heads of 8 from 4 heads of 4 when the shapes
    alone cannot. Attributes the rewrite left alone are not compared: many are stale copies of sizes
    that the forward never reads.

    Greedy: each round tries every size field of the config at the values that would fix a dim still
    off (built on ``meta``), keeps the change that leaves the fewest differences, and stops when none
    are left or no change helps.
    """
    target = tensor_shapes(model) if target is None else target
    config = copy.deepcopy(model.config if config is None else config)
    values = config.to_dict()
    # one number per field (Swin's per-stage lists are not searched) or unset (GPT-2's n_inner)
    fields = [f for f in SIZE_FIELDS if f in values and (values[f] is None or type(values[f]) is int)]
    fit = ConfigFit()

    def diffs(changes: dict[str, int]) -> tuple[list[str], dict[str, tuple[int, ...]], list[tuple[int, int]]] | None:
        fit.trials += 1
        try:
            twin = build_from_config(model, with_changes(config, changes))
        except Exception:  # noqa: BLE001 - the constructor rejects this combination
            return None
        shapes = tensor_shapes(twin)
        problems = _shape_diffs(target, shapes)
        pairs = [(h, w) for k in target.keys() & shapes.keys() if len(shapes[k]) == len(target[k])
                 for h, w in zip(shapes[k], target[k]) if h != w]
        if changed_attrs:
            attrs = _attr_pairs(model, twin, changed_attrs)
            problems += [f"{name}: {want} vs the config's {have}" for name, have, want in attrs]
            pairs += [(int(h), int(w)) for _, h, w in attrs if float(h).is_integer() and float(w).is_integer() and h]
        return problems, shapes, pairs

    seeds = list(seeds)
    pin = _head_dim_pin(model, config) if search else {}  # (no size field moves: nothing to pin)
    starts = [{**pin, **seed} for seed in seeds] or [pin]
    tried = [(start, result) for start in starts if (result := diffs(start)) is not None]
    if not tried:
        fit.mismatches = [f"{type(model).__name__}(config) fails with the model's own config" if not seeds
                          else f"{type(model).__name__}(config) fails with every candidate change"]
        return fit
    fit.changes, (problems, _, pairs) = min(tried, key=lambda sr: len(sr[1][0]))
    while search and problems and fit.trials < max_trials:
        best: tuple[dict[str, int], list[str], list[tuple[int, int]]] | None = None
        for f in fields:
            current = fit.changes.get(f, getattr(config, f, None))
            for value in sorted(_candidates(current, set(pairs))):
                trial = {**fit.changes, f: value}
                result = diffs(trial)
                if result is not None and (best is None or len(result[0]) < len(best[1])):
                    best = (trial, result[0], result[2])
        if best is None or len(best[1]) >= len(problems):
            break
        fit.changes, problems, pairs = best
    if not problems and "head_dim" in fit.changes and "head_dim" not in config.to_dict():
        unpinned = {k: v for k, v in fit.changes.items() if k != "head_dim"}
        result = diffs(unpinned)
        if result is not None and not result[0]:
            fit.changes = unpinned  # the model never reads it: leave config.json as it was
    fit.mismatches = problems
    log.debug("config fit for %s: %s (%d trials, %d left)", type(model).__name__, fit.describe(), fit.trials,
              len(problems))
    return fit


def _attr_pairs(model: nn.Module, twin: nn.Module, only: set[str]) -> list[tuple[str, float, float]]:
    """``(name, the config's value, the model's value)`` of the listed attributes that differ."""
    mine, theirs = numeric_attrs(model), numeric_attrs(twin)
    return [(k, theirs[k], mine[k]) for k in sorted(only) if k in mine and k in theirs and mine[k] != theirs[k]]


def _head_dim_pin(model: nn.Module, config: Any) -> dict[str, int]:
    """``{"head_dim": d}`` when the config derives the head size (``hidden // heads``) and says so explicitly
    changes nothing for the model as configured now; pruning keeps heads whole, so their size must stay."""
    if "head_dim" in config.to_dict():
        return {}
    sizes = {v for k, v in numeric_attrs(model).items() if k.rsplit(".", 1)[-1] == "head_dim"}
    if len(sizes) != 1:
        return {}
    pin = {"head_dim": int(sizes.pop())}
    try:
        plain, pinned = build_from_config(model, config), build_from_config(model, with_changes(config, pin))
    except Exception:  # noqa: BLE001
        return {}
    inert = tensor_shapes(plain) == tensor_shapes(pinned) and numeric_attrs(plain) == numeric_attrs(pinned)
    return pin if inert else {}


def summarize(problems: list[str], show: int = _SHOW) -> str:
    """The first ``show`` problems, then a count of the rest."""
    head = "; ".join(problems[:show])
    return head + (f"; ... {len(problems) - show} more" if len(problems) > show else "")


def reload_mismatch(model: nn.Module, config: Any, example_inputs: Any, *, atol: float = 1e-5) -> str | None:
    """Build ``type(model)(config)`` on the CPU, load ``model``'s weights into it, and compare outputs.

    What plain ``from_pretrained`` would do with a saved directory, without writing one. Returns
    ``None`` when the outputs agree within ``atol`` (relative to their scale), else what differs.
    """
    try:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        validate_config(config)
        with torch.device(device):
            twin = type(model)(config).to(dtype)  # built for real: non-persistent buffers are computed
        missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
        if missing or unexpected:
            return f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
        twin.eval()
        inputs = as_example_inputs(example_inputs)
        with torch.no_grad():
            err = compare_outputs(inputs.call(twin), inputs.call(model))
    except Exception as e:  # noqa: BLE001 - any failure means the config does not rebuild the model
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if err.max_rel > atol:
        return f"outputs differ after a reload ({err})"
    return None
