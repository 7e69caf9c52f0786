"""The pass contract: ``Pass`` and ``PassResult`` (``Diagnostic`` is re-exported from the analyses).

A pass is a dataclass whose fields are its options, with ``run(program, am) -> PassResult``.
The registry (:mod:`graphopt.infra.registry`) registers pass classes and plain functions.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..analysis.diagnostics import Diagnostic
from .options import check_options
from .text import format_pass

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..analysis.manager import AnalysisManager
    from .program import Program

__all__ = ["Diagnostic", "Pass", "PassResult"]


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, analyses it kept valid, counts and diagnostics."""

    modified: bool
    preserved: frozenset[str] = frozenset()
    stats: dict[str, float] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: The pass changed output shapes on purpose (e.g. ``prune(outputs=true)``): verification then
    #: checks only that the model runs and stays finite.
    changes_outputs: bool = False

    def skip(self, target: str, why: str) -> None:
        """Record that ``target`` was left alone because ``why``."""
        self.diagnostics.append(Diagnostic(target, why, "skipped"))

    def note(self, target: str, message: str, level: str = "info") -> None:
        self.diagnostics.append(Diagnostic(target, message, level))


class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are the pass's options.

    Class attributes a pass may set:

    - ``tolerance``: the largest relative output error (``max|new-old| / max|old|``) against the
      previous program that verification accepts; ``None`` marks a lossy pass (shapes and finiteness
      are still checked).
    - ``needs_calibration``: the pass reads ``program.calib`` and fails clearly without it.
    - ``needs_original``: the pass reads ``program.original`` (the model given to ``optimize``, e.g. as a
      distillation teacher); ``optimize(inplace=True)`` then keeps a copy of it.
    - ``renamed``: options it no longer has, by old name -> how to write them now (pipeline text with an
      old name fails with that advice instead of "no option").
    - ``change``: the kind of change its edits make (``"dyt"``, ``"prune"``, ``"depth"``, ``"quantize"``,
      or a kind of its own; ``""`` for an exact rewrite). Each edit records it, and ``heal`` picks its
      recipe from it, so a new lossy pass needs no edit in heal.
    - ``choices``, ``slot``, ``stage``: what the pass offers ``optimize(goal=...)``'s search
      (:mod:`graphopt.search`): the option sets to try, mildest first (``None``: not searched; ``({},)``:
      on or off with its defaults); passes of one ``slot`` are alternatives (``drop_blocks`` or
      ``replace_blocks``: slot ``"depth"``; ``""``: the pass's own name); ``stage`` orders a searched
      pipeline, lower first (depth 10, prune 20, dyt 30, merge 40, factorize 50, heal 80, quantize 90: quantize last).
    - ``repairs``: the pass recovers what earlier lossy passes lost (``heal``): it is not a choice of its
      own; the search adds it to the measured candidates whose quality floor binds (``Goal.heal``).
    - ``per_layer``: the option that sets the pass's choice layer by layer (a ``{layer glob: value}`` map), then
      the options such a value stands for: ``quantize``'s ``("layers", "scheme", "method")``. The search's
      per-layer plans (:mod:`graphopt.search.layerwise`) set it, with :meth:`layer_value`,
      :meth:`layer_units`, :meth:`layer_variant` and :meth:`layer_error`; ``()``: none. ``layer_unchanged``: the
      value that leaves a layer as it is (``quantize``: ``float``), which every plan may give a layer.
    - ``streams_by_forwards``: the pass reads the weights only through forwards of the model, and through
      :meth:`Program.loaded` where it reads them otherwise (``drop_blocks``, ``replace_blocks``), so a run streamed
      from disk runs it on the whole model with one block's weights held at a time (:mod:`graphopt.stream`); such
      passes come before the block-local ones (:meth:`for_block`) in a streamed pipeline.
    """

    name: ClassVar[str] = ""
    #: options the report's label always shows, defaults included (the values that decide the result)
    decisive: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float | None] = 1e-5
    needs_calibration: ClassVar[bool] = False
    needs_original: ClassVar[bool] = False
    change: ClassVar[str] = ""
    renamed: ClassVar[dict[str, str]] = {}
    choices: ClassVar[tuple[dict[str, Any], ...] | None] = None
    slot: ClassVar[str] = ""
    stage: ClassVar[int] = 50
    repairs: ClassVar[bool] = False
    per_layer: ClassVar[tuple[str, ...]] = ()
    layer_unchanged: ClassVar[str] = ""
    streams_by_forwards: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)  # declared types and ranges, for passes built in Python as from text

    def run(self, program: Program, am: AnalysisManager) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def options(self, *, all: bool = False) -> dict[str, Any]:
        """This pass's option values (only those that differ from the defaults unless ``all``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if all or value != default:
                out[f.name] = value
        return out

    def moot(self, model: nn.Module) -> dict[str, str]:
        """Options set here that change nothing on ``model``, each with why (``quantize(lm_head=true)`` on a model
        without an LM head): the search measures such a choice once, as the choice without them."""
        return {}

    def for_block(self, block: str) -> Pass | str:
        """This pass restricted to the block named ``block``, for a run streamed from disk
        (:mod:`graphopt.stream`: each block's weights are in memory only while its passes run); or why the pass
        needs the whole model (the default), which the streamed run gives as its refusal."""
        return (f"{self.name} works on the whole model, not one block at a time: load the model and call "
                "optimize(), or stream a block-local pass (quantize with method=rtn or gptq)")

    def outside_blocks(self, program: Program, blocks: list[str]) -> Pass | str | None:
        """For a run streamed from disk, once every block is done: this pass restricted to the layers outside
        ``blocks`` (run with those loaded and the blocks not), ``None`` when it has nothing to do there (the
        default), or why it leaves them as they are (the run warns with it)."""
        return None

    # --- per-layer plans of the goal search (``per_layer``) ---------------------------------------------
    def layer_value(self) -> str | None:
        """The value this configured pass gives every layer it changes (``quantize(scheme=int4)``: ``int4``), or
        None when it does not give them all one (a bits budget, a layers map): the search plans layer by layer
        over the choices that have one."""
        return None

    def layer_units(self, program: Program) -> list[list[str]]:
        """The layers this pass would change on ``program``, in groups that take one value together (layers that
        read one tensor)."""
        return []

    def layer_variant(self, program: Program, name: str, value: str) -> nn.Module | None:
        """Layer ``name`` as ``value`` would make it, built cheaply (``quantize``: rounded to nearest), which the
        latency table times; None when the value does not apply to this layer."""
        return None

    def layer_error(self, program: Program, name: str, value: str) -> torch.Tensor | None:
        """The change ``value`` makes to the weight of layer ``name``, one row per output as
        :func:`graphopt.analysis.layers.weight_rows` lays a weight out; the search weighs it by the probed
        Gauss-Newton diagonal (:func:`graphopt.analysis.probes.fisher_diagonal`) to
        estimate the loss of each layer's value. None: the value does not apply to the layer."""
        return None

    def __str__(self) -> str:
        return format_pass(self)

    def label(self) -> str:
        """``str(self)`` plus the decisive options at their defaults: ``prune(ratio=0.3)``, not ``prune``."""
        return format_pass(self, tuple(self.decisive))

    @classmethod
    def doc(cls) -> str:
        """The first line of the pass's docstring."""
        text = inspect.getdoc(cls) or ""
        return text.strip().splitlines()[0] if text.strip() else ""
