"""Depth rewrites: ``drop_blocks`` and ``replace_blocks`` make a model shallower.

The model's repeated blocks are found structurally (:mod:`graphopt.analysis.blocks`). Unless
``start`` is given, the span of ``n`` consecutive blocks to cut is the one whose input and output
hidden states are closest in angular distance on the calibration data (Gromov et al. 2024, "The
Unreasonable Ineffectiveness of the Deeper Layers"); every candidate's distance is reported.

- ``drop_blocks`` removes the span.
- ``replace_blocks`` puts a linear map estimated on the calibration data in its place (ReplaceMe,
  :mod:`.block_map`): folded into the previous block's down-projection when the blocks are pre-norm
  (no parameter added; the model stays loadable by plain ``transformers``), else a ``LinearBlock``.

The model keeps its class and inputs; KV-cache layer indices and the HF config's layer count
follow the removal (:mod:`.edit`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

from graphopt.analysis import AnalysisManager
from graphopt.analysis.blocks import BlockList, find_blocks, read_elsewhere
from graphopt.analysis.depth_stats import boundary_shapes, span_distances
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass
from graphopt.nn.depth import LinearBlock

from .block_map import down_projection, estimate_map, folded_tensors, linear_block, refine_cosine
from .edit import cut_span, skipping_differs

log = logging.getLogger(__name__)


def _span_name(blocks: BlockList, start: int, n: int) -> str:
    return blocks.names[start] if n == 1 else f"{blocks.names[start]}-{start + n - 1}"


class NothingToCut(Exception):
    """The model offers no span these options may cut (no blocks, none that keeps the shape); says why."""


@dataclass
class _Depth(Pass):
    """What drop_blocks and replace_blocks share: finding the blocks and choosing the span.

    A model with nothing to cut (no repeated blocks, no allowed span) leaves the pass unchanged with a warning
    that says why, as fold_bn does on a model without BatchNorm; options the user gave that cannot hold
    (``start=`` a special block, ``n`` too large, ``blocks=`` not a stack) are errors.
    """

    n: Annotated[int, Range(1)] = 1  # how many consecutive blocks to cut
    start: Annotated[int, Range(0)] | None = None  # the first block to cut; None: the closest span on calibration data
    blocks: str | None = None  # the ModuleList of blocks; None: found (the largest stack on the residual path)
    calib_batches: Annotated[int, Range(1)] = 32  # calibration batches read to choose the span (and fit the map)

    streams_by_forwards = True  # every weight read is a forward, or inside program.loaded

    def _batches(self, program: Program) -> list:
        batches = program.calib_batches(self.calib_batches) if program.calib is not None else []
        if not batches and self.needs_calibration:
            raise ValueError(f"{self.name}: the calibration data is empty; pass calib=<iterable of model inputs>")
        return batches

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        try:
            return self._cut(program, result)
        except NothingToCut as why:
            result.note("", f"nothing cut: {why}", "warning")
            return result

    def _cut(self, program: Program, result: PassResult) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _blocks(self, program: Program) -> BlockList:
        try:
            blocks = find_blocks(program.module, program.example_inputs, self.blocks)
        except ValueError as e:
            if self.blocks is not None:
                raise
            raise NothingToCut(str(e)) from None
        cuttable = len(blocks) - len(blocks.special)
        if self.n >= len(blocks):
            raise ValueError(f"{self.name}(n={self.n}): {blocks.path} has {len(blocks)} blocks; n must leave at "
                             f"least one (n <= {len(blocks) - 1})")
        if self.n > cuttable:
            raise ValueError(f"{self.name}(n={self.n}): only {cuttable} of the {len(blocks)} blocks in {blocks.path} "
                             f"can be cut ({'; '.join(blocks.special.values())})")
        if self.start is not None and self.start + self.n > len(blocks):
            raise ValueError(f"{self.name}(start={self.start}, n={self.n}): {blocks.path} has blocks 0 .. "
                             f"{len(blocks) - 1}, so start must be <= {len(blocks) - self.n}")
        return blocks

    def _allowed(self, blocks: BlockList, start: int, taps: dict[int, str],
                 shapes: list[tuple[int, ...]]) -> str | None:
        """Why the span at ``start`` cannot be cut, or None. A block output another reader taps (``taps``,
        :func:`read_elsewhere`) at or after the span would be removed, or renumbered under its reader; a span
        whose output differs in shape from its input (a CNN stage that downsamples) has nothing to map."""
        inside = [i for i in range(start, start + self.n) if i in blocks.special]
        if inside:
            return blocks.special[inside[0]]
        if shapes[start] != shapes[start + self.n]:
            return (f"it takes hidden states of shape {list(shapes[start])} and gives {list(shapes[start + self.n])}: "
                    "only a span that keeps the shape can be cut or replaced")
        tapped = [i for i in sorted(taps) if i >= start]
        return (f"{taps[tapped[0]]}; a cut at or before it would change what that reader sees"
                if tapped else None)

    def _choose(self, program: Program, blocks: BlockList, batches: list, result: PassResult,
                shapes: list[tuple[int, ...]] | None = None) -> int:
        """The span to cut: ``start`` when given, else the allowed span of least angular distance. ``shapes``:
        the blocks' :func:`boundary_shapes`, when the caller has them."""
        taps = read_elsewhere(program.module, blocks, program.example_inputs)
        shapes = shapes or boundary_shapes(program.module, blocks, program.example_inputs)
        if self.start is not None:
            why = self._allowed(blocks, self.start, taps, shapes)
            if why:
                raise ValueError(f"{self.name}(start={self.start}): {why}")
        distances = span_distances(program.module, blocks, batches, self.n) if batches else []
        allowed = [s for s in range(len(blocks) - self.n + 1) if self._allowed(blocks, s, taps, shapes) is None]
        if not allowed:
            reasons = {self._allowed(blocks, s, taps, shapes) for s in range(len(blocks) - self.n + 1)}
            raise NothingToCut(f"no span of {self.n} block(s) of {blocks.path} can be cut: {'; '.join(sorted(reasons))}")
        chosen = self.start if self.start is not None else min(allowed, key=lambda s: distances[s])
        why = skipping_differs(program.module, blocks, chosen, self.n, program.example_inputs)
        if why:
            raise (ValueError(f"{self.name}(start={self.start}): {why}") if self.start is not None else NothingToCut(why))
        for s, d in enumerate(distances):
            why = self._allowed(blocks, s, taps, shapes)
            tail = " (chosen)" if s == chosen else (f" (not a candidate: {why})" if why else "")
            result.note(_span_name(blocks, s, self.n), f"angular distance {d:.4f}{tail}")
        if distances:
            result.stats["distance"] = round(distances[chosen], 4)
        result.stats["start"] = chosen
        return chosen

    def _finish(self, program: Program, blocks: BlockList, result: PassResult) -> PassResult:
        result.modified = True
        result.stats["blocks_before"] = len(blocks)
        result.stats["blocks_after"] = sum(not isinstance(b, LinearBlock) for b in program.get_submodule(blocks.path))
        result.stats["blocks_removed"] = self.n
        return result


@register_pass("drop_blocks", tolerance=None, change="depth", slot="depth", stage=10,
               choices=({"n": 1}, {"n": 2}))
class DropBlocks(_Depth):
    """Remove n consecutive blocks (the span of least angular distance, or the one at start)."""

    decisive = ("n",)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.start is None

    def _cut(self, program: Program, result: PassResult) -> PassResult:
        blocks = self._blocks(program)
        start = self._choose(program, blocks, self._batches(program), result)
        cut_span(program, blocks, start, self.n, None, result)
        return self._finish(program, blocks, result)


@register_pass("replace_blocks", tolerance=None, change="depth", slot="depth", stage=10,
               choices=({"n": 1}, {"n": 2}))
class ReplaceBlocks(_Depth):
    """Replace n consecutive blocks by a linear map fitted on calibration data (ReplaceMe)."""

    decisive = ("n", "method")
    needs_calibration = True

    method: Literal["lstsq", "cosine"] = "lstsq"  # fit the map by least squares, or by Adam on a cosine loss
    fold: bool = True  # fold the map into the previous block's down-projection where the blocks allow it
    steps: Annotated[int, Range(1)] = 400  # method=cosine: Adam steps
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-4  # method=cosine: Adam learning rate

    def _cut(self, program: Program, result: PassResult) -> PassResult:
        blocks = self._blocks(program)
        shapes = boundary_shapes(program.module, blocks, program.example_inputs)
        hidden = shapes[0]
        if len(hidden) > 3:
            raise NothingToCut(f"the blocks of {blocks.path} take hidden states of shape {list(hidden)}, not (batch, "
                               "tokens, features): a linear map over the last dim would mix positions, not features "
                               "(a CNN stage); drop_blocks can cut such a span")
        batches = self._batches(program)
        start = self._choose(program, blocks, batches, result, shapes)
        span = _span_name(blocks, start, self.n)
        down = None
        if self.fold and start > 0:
            down = down_projection(program.module, blocks.names[start - 1], batches[0])
            if down is None:
                result.note(span, f"the map is a LinearBlock: {blocks.names[start - 1]} does not end with a residual "
                            "add of its last linear layer's output (post-norm blocks), so it cannot be folded")
        elif self.fold:
            result.note(span, "the map is a LinearBlock: no block before the span to fold it into")
        stats, structure = estimate_map(program.module, blocks, start, self.n, batches, down,
                                        sample=self.method == "cosine")
        weight, bias = stats.solve()
        result.stats["rows"] = stats.rows
        if stats.rows < weight.shape[1]:  # fewer equations than unknowns per output: it fits the data, not the blocks
            raise ValueError(
                f"replace_blocks: the map for {span} would be fitted from {stats.rows} token rows, fewer than the "
                f"hidden width {weight.shape[1]}: underdetermined. Give at least {weight.shape[1]} rows of calibration "
                f"data (more or longer batches, calib_batches={self.calib_batches} are read), or use drop_blocks")
        if self.method == "cosine":
            weight, bias, before, after = refine_cosine(stats, weight, bias, steps=self.steps, lr=self.lr)
            result.note(span, f"cosine refinement on {stats.samples()[0].shape[0]} sampled rows: mean cosine "
                        f"{before:.4f} -> {after:.4f}" + (" (kept the least-squares map)" if after <= before else ""))
        if down is not None:
            with program.loaded(down):
                for fqn, value in folded_tensors(program.module, down, weight, bias).items():
                    program.set_tensor(fqn, value)
            cut_span(program, blocks, start, self.n, None, result)
            result.note(span, f"replaced by a linear map folded into {down} (no parameter added)")
            result.stats["folded"] = 1
        else:
            if isinstance(structure, ValueError):
                raise ValueError(f"replace_blocks: {span} cannot be replaced by a linear map: {structure}; "
                                 "use drop_blocks") from None
            with program.loaded(blocks.names[start]):  # (its dtype and device, which a streamed block has only then)
                like = next(program.get_submodule(blocks.names[start]).parameters())
                new = linear_block(weight, bias, structure, self.n, like)
            cut_span(program, blocks, start, self.n, new, result)
            result.note(span, f"replaced by a LinearBlock ({weight.numel() + (0 if bias is None else bias.numel()):,} "
                        "parameters)")
            result.stats["folded"] = 0
        return self._finish(program, blocks, result)
