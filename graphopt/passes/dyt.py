"""``dyt``: replace LayerNorm / RMSNorm layers with elementwise DyT or ELN layers (lossy; ``heal`` after).

Sources: Zhu et al. 2025, "Transformers without Normalization" (DyT); Stollenwerk 2025, "Elementwise
Layer Normalization" (ELN); Heimersheim 2025, "Transformers Don't Need LayerNorm at Inference Time"
(removing norms from a pretrained model needs fine-tuning to recover).

Norms are found structurally (:func:`graphopt.analysis.norms.probe_norm`), never by class name. Modes:

- ``init``: the paper's architecture swap. ``α`` starts at ``alpha0``, or per role when unset: 0.5
  for LayerNorm models; for RMSNorm (LLaMA-style) models the paper's width-dependent pair
  (attention norms / FFN and final norms: 0.8/0.2 up to width 4096, 0.6/0.15 up to 5120, 0.2/0.05
  beyond). ``γ, β`` copy the norm's affine (``affine=copy``) or start at 1, 0 (``affine=fresh``).
- ``calibrated``: fit ``α`` (one per channel unless ``per_channel_alpha=false``), ``γ, β`` of each
  layer by least squares to the norm's outputs on calibration data, in execution order, so each fit
  sees the already-converted upstream. With ``fit_to=original`` the targets are the norm outputs of
  the model as it was before this pass (later fits correct upstream error); with ``fit_to=local``
  they are the norm applied to the converted model's own inputs.

RMSNorm replacements have no ``β``. A swap is not output-preserving: follow it with ``heal``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.analysis.blocks import BlockList, block_of
from graphopt.analysis.calibration import mask_of
from graphopt.analysis.hooked import Stop, run_hooked
from graphopt.analysis.norms import NormInfo, is_norm_like, probe_norm, reference_norm
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.progressive import heal_each
from graphopt.infra.registry import register_pass
from graphopt.nn.dyt import SQUASH, VARIANTS, fit_elementwise

log = logging.getLogger(__name__)



@dataclass
class _Norm:
    name: str
    info: NormInfo
    role: str = "other"  # "attention" | "ffn" | "final" | "other"


def default_alpha0(kind: str, role: str, channels: int) -> float:
    """The DyT paper's initial ``α``: 0.5 (non-LLM); width-dependent attention/other pair for LLMs."""
    if kind != "rmsnorm":
        return 0.5
    attn, other = (0.8, 0.2) if channels <= 4096 else (0.6, 0.15) if channels <= 5120 else (0.2, 0.05)
    return attn if role == "attention" else other


def norms_by_block(norms: Sequence[_Norm], stacks: list[BlockList]) -> dict[str, set[str]]:
    """Norm names grouped by the repeated block they sit in (the ``"blocks"`` analysis), in order; a norm
    outside every block (embeddings, final norm) is a group of its own."""
    groups: dict[str, set[str]] = {}
    for n in norms:
        groups.setdefault(block_of(n.name, stacks) or n.name, set()).add(n.name)
    return groups


def find_norms(program: Program, *, target: str = "all", where: str = "*",
               result: PassResult | None = None) -> list[_Norm]:
    """Convertible norms of ``program`` in execution order (on the example inputs), with their roles.

    Norm-like modules that do not convert are recorded in ``result`` with the reason.
    """
    found: list[_Norm] = []
    taken: list[str] = []
    for name, module in program.named_modules():
        if not name or not is_norm_like(module) or not fnmatch.fnmatchcase(name, where):
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        info = probe_norm(module)
        if isinstance(info, str):
            if result is not None:
                result.skip(name, info)
            continue
        if target != "all" and info.kind != target:
            if result is not None:
                result.skip(name, f"is a {info.kind}; target={target}")
            continue
        found.append(_Norm(name, info))
        taken.append(name)
    order = _execution_order(program, [n.name for n in found])
    found.sort(key=lambda n: order.get(n.name, len(order)))
    _assign_roles(found, order, program.analyses.get("blocks"))
    return found


def _execution_order(program: Program, names: list[str]) -> dict[str, int]:
    if program.device.type == "meta":
        return {}
    try:
        called = program.analyses.get("call_order").names
    except Exception as e:  # noqa: BLE001 - order is a nicety; module order is the fallback
        log.debug("could not run the model to order norms: %s", e)
        return {}
    wanted = set(names)
    return {name: i for i, name in enumerate(n for n in called if n in wanted)}


def _assign_roles(norms: list[_Norm], order: dict[str, int], stacks: list[BlockList]) -> None:
    blocks: dict[str, list[_Norm]] = {}
    loose: list[_Norm] = []
    for n in norms:
        block = block_of(n.name, stacks)
        (blocks.setdefault(block, []) if block else loose).append(n)
    for members in blocks.values():
        for i, n in enumerate(members):  # already in execution order
            n.role = "ffn" if i == len(members) - 1 and len(members) > 1 else "attention"
    if loose and loose[-1].name in order and order[loose[-1].name] == max(order.values(), default=-1):
        loose[-1].role = "final"


def _select_rows(act: torch.Tensor, info: NormInfo, mask: torch.Tensor | None, limit: int,
                 seed: int) -> torch.Tensor:
    """Token rows ``(N, C)`` of an activation: padding dropped, at most ``limit`` (seeded choice)."""
    if info.channel_dim == 1 and act.dim() > 2:
        rows = act.detach().movedim(1, -1).reshape(-1, info.channels)
    else:
        if mask is not None and act.dim() == 3 and tuple(act.shape[:2]) == tuple(mask.shape):
            act = act.detach()[mask.to(torch.bool).to(act.device)]
        rows = act.detach().reshape(-1, info.channels)
    if rows.shape[0] > limit:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.shape[0], generator=g)[:limit].to(rows.device)]
    return rows.float().cpu()


def _capture(program: Program, norms: list[_Norm], batches: list[Any], limit: int, *, output: bool,
             calls: list[int] | None = None) -> dict[str, list[list[torch.Tensor]]]:
    """Rows of the inputs (or outputs) of ``norms``: ``{name: [per batch: [per call: (N, C)]]}``.

    With ``calls`` (one norm only), batch ``b``'s forward pass ends once ``calls[b]`` calls are captured.
    """
    out: dict[str, list[list[torch.Tensor]]] = {n.name: [] for n in norms}
    state: dict[str, Any] = {}

    def grab(norm: _Norm, act: torch.Tensor) -> None:
        got = state["rows"][norm.name]
        got.append(_select_rows(act, norm.info, state["mask"], limit, state["batch"] * 1009 + len(got)))
        if calls is not None and len(got) >= calls[state["batch"]]:
            raise Stop

    def before(b: int, inputs: Any) -> None:
        state.update(rows={n.name: [] for n in norms}, mask=mask_of(inputs), batch=b)

    def after(b: int, inputs: Any) -> None:
        for n in norms:
            out[n.name][state["batch"]] = state["rows"][n.name]

    for n in norms:  # a batch no call is wanted from is not run: its rows stay empty
        out[n.name] = [[] for _ in batches]
    handles = []
    for n in norms:
        mod = program.get_submodule(n.name)
        handles.append(mod.register_forward_hook(lambda m, a, o, _n=n: grab(_n, o)) if output
                       else mod.register_forward_pre_hook(lambda m, a, _n=n: grab(_n, a[0])))
    wanted = [i for i in range(len(batches)) if calls is None or calls[i] > 0]
    run_hooked(program.module, [batches[i] for i in wanted], handles, device=program.device,
               before=lambda j, batch: before(wanted[j], batch), after=after)
    return out


def _cat(per_batch: list[list[torch.Tensor]]) -> torch.Tensor | None:
    rows = [r for calls in per_batch for r in calls]
    return torch.cat(rows) if rows else None


@register_pass("dyt", tolerance=None, change="dyt", stage=30)
class DyTPass(Pass):
    """Replace LayerNorm/RMSNorm layers with elementwise DyT (or ELN) layers; follow with heal."""

    decisive = ("mode", "variant")

    mode: Literal["init", "calibrated"] = "calibrated"  # fit α, γ, β on calibration data, or the paper's init
    target: Literal["layernorm", "rmsnorm", "all"] = "all"  # which kinds of norm are replaced
    variant: Literal["dyt", "eln"] = "dyt"  # DyT (tanh) or ELN (elementwise layer norm)
    where: str = "*"  # glob on the module names of the norms replaced
    alpha0: Annotated[float, Range(0, lo_open=True)] | None = None  # mode=init: the starting α (None: per role)
    affine: Literal["copy", "fresh"] = "copy"  # mode=init: γ, β copied from the norm, or 1 and 0
    per_channel_alpha: bool | None = None  # one α per channel (None: when calibrated; init: the paper's scalar)
    fused: bool = False  # run the fused Triton kernel (GPUs; variant=dyt)
    fit_to: Literal["original", "local"] = "original"  # calibrated: fit to the original's norm outputs or the local ones
    batches: Annotated[int, Range(1)] = 8  # calibrated: calibration batches read
    max_tokens: Annotated[int, Range(1)] = 8192  # calibrated: the most token rows kept per norm for the fit
    progressive: Annotated[int, Range(0)] = 0  # heal steps after each block's norms (0: all at once, no heal)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.mode == "calibrated" or self.progressive > 0

    @property
    def _per_channel(self) -> bool:
        """α per channel when fitted: better after heal (MiniLM, 800 steps of heal: 0.9801 vs 0.9784)."""
        return self.mode == "calibrated" if self.per_channel_alpha is None else self.per_channel_alpha

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        return self.progressive > 0

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        norms = find_norms(program, target=self.target, where=self.where, result=result)
        if not norms:
            result.note("", f"no convertible norm matched target={self.target}, where={self.where!r}", "warning")
            return result
        if not self.progressive:
            return self._convert(program, norms, result)
        units = []
        for unit, names in norms_by_block(norms, am.get("blocks")).items():
            def convert(names: set[str] = names) -> PassResult:
                now = find_norms(program, target=self.target, where=self.where)
                return self._convert(program, [n for n in now if n.name in names], PassResult(modified=False))
            units.append((unit, convert))
        out = heal_each(program, am, units, steps=self.progressive, kind="dyt", averaged=("mean_fit_rel_mse",))
        out.diagnostics[:0] = result.diagnostics
        return out

    def _convert(self, program: Program, norms: list[_Norm], result: PassResult) -> PassResult:
        if self.fused and self.variant != "dyt":
            result.note("", "fused=true applies to DyT only; ELN layers run unfused", "warning")
        if self.mode == "calibrated":
            errors = self._calibrated(program, norms, result)
            result.stats["mean_fit_rel_mse"] = sum(errors) / len(errors) if errors else float("nan")
        else:
            for n in norms:
                program.replace_module(n.name, self._init_module(n))
        result.modified = True
        result.stats["converted"] = len(norms)
        result.stats["skipped"] = sum(d.level == "skipped" for d in result.diagnostics)
        return result

    # --- building ---------------------------------------------------------------------------------
    def _new(self, n: _Norm, alpha0: float) -> nn.Module:
        info = n.info
        ref = info.weight if info.weight is not None else info.bias
        factory = {"device": ref.device if ref is not None else None,
                   "dtype": ref.dtype if ref is not None else None}
        kwargs: dict[str, Any] = {"channel_dim": info.channel_dim, "alpha0": alpha0,
                                  "bias": info.kind == "layernorm", "per_channel_alpha": self._per_channel}
        if self.variant == "dyt":
            kwargs["fused"] = self.fused
        return VARIANTS[self.variant](info.channels, **kwargs, **factory)

    def _init_module(self, n: _Norm) -> nn.Module:
        alpha0 = self.alpha0 if self.alpha0 is not None else default_alpha0(n.info.kind, n.role, n.info.channels)
        new = self._new(n, alpha0)
        if self.affine == "copy":
            with torch.no_grad():
                if n.info.weight is not None:
                    new.weight.copy_(n.info.weight)
                if n.info.bias is not None and new.bias is not None:
                    new.bias.copy_(n.info.bias)
        return new

    # --- calibration ------------------------------------------------------------------------------
    def _calibrated(self, program: Program, norms: list[_Norm], result: PassResult) -> list[float]:
        if program.calib is None:
            raise ValueError("dyt(mode=calibrated) needs calibration data: pass calib=<iterable of model "
                             "inputs> to optimize(), or use dyt(mode=init)")
        if program.device.type == "meta":
            raise ValueError("dyt(mode=calibrated) needs real weights, not the meta device; use mode=init")
        batches = program.calib_batches(self.batches)
        if not batches:
            raise ValueError("dyt(mode=calibrated): the calibration data is empty")
        limit = max(1, self.max_tokens // len(batches))
        targets = (_capture(program, norms, batches, limit, output=True) if self.fit_to == "original" else None)
        squash = SQUASH[self.variant]
        errors: list[float] = []
        for n in norms:
            calls = [len(c) for c in targets[n.name]] if targets is not None else None
            x = _cat(_capture(program, [n], batches, limit, output=False, calls=calls)[n.name])
            if targets is not None:
                y = _cat(targets.pop(n.name))
            else:
                y = _local_target(x, n.info) if x is not None else None
            if x is None or y is None or x.shape != y.shape:
                result.note(n.name, "not executed on the calibration data: converted with init values "
                                    "(heal trains it)", "warning")
                program.replace_module(n.name, self._init_module(n))
                continue
            fit = fit_elementwise(x, y, squash, bias=n.info.kind == "layernorm",
                                  per_channel_alpha=self._per_channel)
            new = self._new(n, float(fit.alpha.mean()))
            with torch.no_grad():
                new.alpha.copy_(fit.alpha)
                new.weight.copy_(fit.weight)
                if new.bias is not None and fit.bias is not None:
                    new.bias.copy_(fit.bias)
            program.replace_module(n.name, new)
            errors.append(fit.rel_mse)
            result.note(n.name, f"{n.info.kind} -> {self.variant}: alpha={float(fit.alpha.mean()):.4g}, "
                                f"fit rel. MSE {fit.rel_mse:.3g} on {x.shape[0]} tokens")
            log.info("dyt %s: alpha=%.4g rel_mse=%.3g", n.name, float(fit.alpha.mean()), fit.rel_mse)
        return errors


def _local_target(x: torch.Tensor, info: NormInfo) -> torch.Tensor:
    y = reference_norm(x, info.kind, info.eps)
    if info.weight is not None:
        y = y * info.weight.float().cpu()
    if info.bias is not None:
        y = y + info.bias.float().cpu()
    return y
