"""``optimize_streamed``: a pipeline of block-local passes run on a model whose weights stay on disk.

The model is built from the folder's config with its parameters on ``meta`` (no memory). The weights outside
the repeated blocks (embedding tables, final norm, LM head) are loaded to record what the first block takes
on each calibration batch, then freed. Block by block: the block's weights are read from the files, every
pass runs restricted to it (:meth:`graphopt.Pass.for_block`) on the recorded inputs, the block's outputs
become the next block's inputs, its tensors are written to a part file and its memory freed. The parts are
joined into one ``model.safetensors`` beside the edit log (``graphopt.load`` reads it as it reads a ``save``);
nothing is written to the output folder before every block is done, and the source folder is only read.

Passes that read the model only through its forwards (``drop_blocks``, ``replace_blocks``:
``Pass.streams_by_forwards``) run first, on the whole model with each block's weights read while it runs
(:mod:`.on_demand`). A pipeline with a pass that needs the whole model in memory (``prune``'s global allocation,
end-to-end ``heal``, mixed precision's ranking) runs in memory when the model fits, else is refused before any
work, with the figures (:mod:`.whole`). What is not done for a streamed model: no output check against the
original (that would run the original too; the result's notes say so) and no rollback of one pass (a failed
pass fails the run, and the output folder stays as it was).
"""

from __future__ import annotations

import copy
import logging
import resource
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.blocks import (
    BlockCursor,
    BlockList,
    find_blocks,
    first_block_inputs,
    next_inputs,
    same_class_lists,
)
from ..analysis.diagnostics import Diagnostic
from ..emit.save import checked_edits, commit, manifest_text, save, tensors_to_write, weights_metadata
from ..emit.saved_model import nonpersistent_buffers
from ..infra.contract import Pass
from ..infra.metrics import PeakMemory, give_back_memory, large_allocations_mapped
from ..infra.pipeline import Pipeline, as_pipeline
from ..infra.program import Program
from ..optimize import optimize
from ..progress import track
from ..units import MIB
from .checkpoint import Checkpoint, StreamError, meta_skeleton, offload
from .on_demand import WeightsOnDemand
from .parts import Parts
from .whole import fits_in_memory

log = logging.getLogger(__name__)

SUMMED = ("layers", "weights", "weight_bytes", "weight_mib_before", "weight_mib_after")


@dataclass
class StreamedResult:
    """What a streamed run wrote and measured."""

    path: Path  # the output folder: graphopt.load(path, base_model) rebuilds the model
    pipeline: Pipeline
    blocks: int
    seconds: float
    peak_mib: float  # resident memory above the level where the run began (sampled)
    process_peak_mib: float  # the process's peak resident memory (since it started)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per pass, summed over the blocks
    diagnostics: list[Diagnostic] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict, repr=False)  # tied names as written (the manifest's)
    nonpersistent: list[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        labels = ",".join(p.label() for p in self.pipeline)
        lines = [f"streamed {labels} over {self.blocks} blocks in {self.seconds:.1f} s; peak memory "
                 f"{self.peak_mib:.0f} MiB above the start ({self.process_peak_mib:.0f} MiB for the process); "
                 f"written to {self.path}"]
        lines += [f"  {name}: {stats}" for name, stats in self.stats.items()]
        lines += [f"  {d.level}: {d.target}: {d.message}" if d.target else f"  {d.level}: {d.message}"
                  for d in self.diagnostics]
        return "\n".join(lines)


def _refusals(passes: Pipeline, calib: Any) -> tuple[list[str], list[str]]:
    """Why the pipeline cannot run one block at a time (it may run on the whole model in memory), and what is wrong
    with it either way."""
    whole, errors = [], []
    local = None  # the first block-local pass
    for p in passes:
        if p.streams_by_forwards:
            if local is not None:
                whole.append(f"{p.label()} runs on the whole stack of blocks, so it must come before {local.label()}, "
                             "which works one block at a time: put it first")
            continue
        local = local or p
        restricted = p.for_block("<block>")
        if isinstance(restricted, str):
            whole.append(restricted)
    errors += [f"{p.name} needs calibration data: pass calib=" for p in passes if p.needs_calibration and calib is None]
    return whole, errors


def _calib_limit(passes: Pipeline) -> int | None:
    """The number of calibration batches the passes read (they must agree: one set of recorded inputs)."""
    limits = {getattr(p, "calib_batches", None) for p in passes if p.needs_calibration}
    if len(limits) > 1:
        raise StreamError(f"the passes read different numbers of calibration batches ({sorted(map(str, limits))}); "
                          "a streamed run records one set of block inputs: give them the same calib_batches")
    return next(iter(limits), None)


def _find_blocks(model: nn.Module, checkpoint: Checkpoint, example: Any) -> BlockList:
    """The model's blocks (:func:`find_blocks`), found on one forward with the weights outside the candidate
    lists mapped, and each candidate block's loaded only while it runs."""
    candidates = [f"{path}.{i}" for path, members in same_class_lists(model) for i in range(len(members))]
    with WeightsOnDemand(model, checkpoint, candidates):
        try:
            return find_blocks(model, example, to_end=False)
        except ValueError as e:
            raise StreamError(f"nothing to stream block by block: {e}") from None


def _run_whole(program: Program, checkpoint: Checkpoint, stack: BlockList, passes: list[Pass],
               result: StreamedResult, seen: set[tuple[str, str]]) -> dict[str, str]:
    """Run the passes that work on the whole stack (``Pass.streams_by_forwards``) with each block's weights read
    while it runs; returns the blocks after them, each with the name its weights have in the files ("" for a
    block a pass built, whose weights are all in memory)."""
    model = program.module
    origin = {id(model.get_submodule(name)): name for name in stack.names}
    inside = f"{stack.path}."
    real = {id(t) for n, t in model.state_dict(keep_vars=True).items() if not t.is_meta and not n.startswith(inside)}
    with WeightsOnDemand(model, checkpoint, stack.names) as on_demand:
        program.weights_of = on_demand.loaded
        try:
            for p in passes:
                _run(program, p, p, result, lambda d: True, seen)
        finally:
            program.weights_of = None
    changed = [n for n, t in model.state_dict(keep_vars=True).items()
               if not t.is_meta and not n.startswith(inside) and id(t) not in real]
    if changed:
        raise StreamError(f"{', '.join(p.label() for p in passes)} changed {changed[0]} outside the blocks, which a "
                          "streamed run cannot write yet; run it on the model in memory")
    items = model.get_submodule(stack.path)
    return {f"{stack.path}.{i}": origin.get(id(block), "") for i, block in enumerate(items)}


def optimize_streamed(source: str | Path, example_inputs: Any, pipeline: str | Pipeline | Iterable[Pass | str], *,
                      out: str | Path, calib: Iterable[Any] | None = None, model: nn.Module | None = None,
                      memory_limit: int | None = None) -> StreamedResult:
    """Run ``pipeline`` on the model saved in the HF folder ``source`` one block at a time, and write the result
    to ``out`` (as :func:`graphopt.save` does).

    ``model``: the model to fill, built on ``meta`` (default: the folder config's ``architectures[0]``).
    A pipeline with a pass that needs the whole model runs on it in memory instead when the model fits
    ``memory_limit`` bytes (default: the memory the system has available; :mod:`graphopt.stream.whole`), and
    raises :class:`StreamError` before any work when it does not.
    """
    passes = as_pipeline(pipeline)
    whole, errors = _refusals(passes, calib)
    if errors:
        raise StreamError("cannot run this pipeline:\n  " + "\n  ".join(whole + errors))
    checkpoint = Checkpoint(source)
    skeleton = model if model is not None else meta_skeleton(checkpoint.config())
    if any(not p.is_meta for p in skeleton.parameters()):
        raise StreamError("model= must be built on the meta device (with torch.device('meta'): ...); its weights "
                          f"come from {source}")
    if whole:
        fits, figures = fits_in_memory(list(passes), checkpoint, memory_limit)
        if not fits:
            raise StreamError("cannot stream this pipeline one block at a time:\n  " + "\n  ".join(whole) +
                              f"\nnor run it on the whole model in memory: {figures}. Stream the passes that work "
                              "block by block, or run the others where the model fits (memory_limit= to allow more)")
        return _in_memory(checkpoint, skeleton, example_inputs, passes, calib, Path(out), figures)
    limit = _calib_limit([p for p in passes if not p.streams_by_forwards])  # (those read the model's own forwards)
    out = Path(out)
    base = copy.deepcopy(skeleton)
    program = Program(skeleton, example_inputs, calib=calib)
    parts = Parts(out.parent / f".{out.name}.parts-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    result = StreamedResult(out, passes, 0, 0.0, 0.0, 0.0)
    try:
        with large_allocations_mapped(), PeakMemory() as peak:  # freed blocks go back to the system at once
            _stream(program, checkpoint, passes, limit, parts, result)
            edits = checked_edits(skeleton, base, program.edits)
            save_id = uuid.uuid4().hex
            text = manifest_text(skeleton, base, edits, str(passes), None, result.aliases, result.nonpersistent,
                                 save_id)
            commit(out, lambda path: parts.join(path, weights_metadata(save_id)), text)
    finally:
        parts.discard()
    result.seconds = time.perf_counter() - start
    result.peak_mib = peak.bytes / MIB
    result.process_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.diagnostics.append(Diagnostic("", "streamed: the outputs were not compared with the original's (that "
                                             "would stream the original too)", "info"))
    for stats in result.stats.values():
        for key in ("weight_mib_before", "weight_mib_after"):
            if key in stats:
                stats[key] = round(stats[key], 4)
    log.info("%s", result)
    return result


def _in_memory(checkpoint: Checkpoint, skeleton: nn.Module, example_inputs: Any, passes: Pipeline, calib: Any,
               out: Path, figures: str) -> StreamedResult:
    """The pipeline run by ``optimize`` on the whole model read into memory, saved to ``out``."""
    log.info("the model fits in memory: %s; running the pipeline on it whole", figures)
    start = time.perf_counter()
    with PeakMemory() as peak:
        checkpoint.load(skeleton, "")
        res = optimize(skeleton, example_inputs, passes, calib=calib, inplace=True, measure=False, on_error="raise")
        save(res, out)
    records = [r for r in res.report.records if r.status != "baseline"]
    result = StreamedResult(out, passes, 0, time.perf_counter() - start, peak.bytes / MIB,
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            stats={r.text: dict(r.stats) for r in records},
                            diagnostics=[d for r in records for d in r.diagnostics])
    result.diagnostics.append(Diagnostic("", f"not streamed: a pass needs the whole model, and it fits in memory "
                                             f"({figures}); optimize ran on it whole", "info"))
    return result


def _stream(program: Program, checkpoint: Checkpoint, passes: Pipeline, limit: int | None, parts: Parts,
            result: StreamedResult) -> None:
    """Load, transform, write and free each block in turn, then the rest of the model."""
    model = program.module
    stack = _find_blocks(model, checkpoint, program.example_inputs)
    seen: set[tuple[str, str]] = set()
    whole = [p for p in passes if p.streams_by_forwards]
    sources = _run_whole(program, checkpoint, stack, whole, result, seen) if whole else {n: n for n in stack.names}
    local = [p for p in passes if not p.streams_by_forwards]
    blocks = list(sources)
    result.blocks = len(blocks)
    checkpoint.load(model, "", skip=tuple(blocks), mapped=True)  # (and lists that are not the stack, if any)
    inputs = []
    for batch in program.calib_batches(limit) if any(p.needs_calibration for p in local) else []:
        inputs += first_block_inputs(model, model.get_submodule(blocks[0]), [batch])
        checkpoint.drop_mapped_pages()
    offload(model, skip=tuple(blocks))
    others = tuple(f"{b}." for b in blocks)
    for name in track(blocks, f"stream: {','.join(p.label() for p in local) or 'copy'}", unit="block"):
        block = model.get_submodule(name)
        if sources[name]:
            checkpoint.load(block, sources[name])
        program.stream = BlockCursor(name, inputs)
        for p in local:
            restricted = p.for_block(name)
            assert isinstance(restricted, Pass)  # checked before any work (_refusals)
            # the block's own notes, and one of each about the rest of the model
            _run(program, p, restricted, result, lambda d, name=name: d.target.startswith(f"{name}.") or not (
                d.target.startswith(others) or "outside where=" in d.message), seen)
        if inputs:
            inputs = program.stream.next_inputs or next_inputs(block, inputs)
        _write(block, name, parts, result)
        offload(block)
        give_back_memory()
        program.stream = None
    outside = [(p, p.outside_blocks(program, blocks)) for p in local]
    result.diagnostics += [Diagnostic("", f"{p.label()}: {rest}", "warning") for p, rest in outside
                           if isinstance(rest, str)]
    outside = [(p, rest) for p, rest in outside if isinstance(rest, Pass)]
    if outside:
        checkpoint.load(model, "", skip=tuple(blocks), mapped=True)
        for p, rest in outside:
            _run(program, p, rest, result, lambda d: not d.target.startswith(others), seen)
        _write(model, "", parts, result, exclude=tuple(blocks))
        offload(model, skip=tuple(blocks))
    else:
        _copy_rest(model, blocks, checkpoint, parts, result)
    for stats in result.stats.values():
        if stats.get("weights"):
            stats["bits_per_weight"] = round(8 * stats["weight_bytes"] / stats["weights"], 3)


def _copy_rest(model: nn.Module, blocks: list[str], checkpoint: Checkpoint, parts: Parts,
               result: StreamedResult) -> None:
    """The tensors outside the blocks, which no pass changed, copied from the source files as they are (tied
    names written once, as aliases), and the non-persistent buffers the model computed."""
    inside = tuple(f"{b}." for b in blocks)
    tied: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(inside):
            tied.setdefault(id(tensor), []).append(name)
    files = {}
    for names in tied.values():
        stored = next((n for n in names if n in checkpoint.files), names[0])
        files[stored] = checkpoint.files.get(stored)
        result.aliases.update({n: stored for n in names if n != stored})
    missing = [n for n, f in files.items() if f is None]
    if missing:
        raise StreamError(f"{checkpoint.folder} holds no tensor {missing[0]!r} (the model expects it; was the "
                          "folder saved from another architecture?)")
    parts.copy(files)
    buffers = {n: t.contiguous() for n, t in nonpersistent_buffers(model).items() if not n.startswith(inside)}
    parts.write(buffers)
    result.nonpersistent += list(buffers)


def _run(program: Program, p: Pass, restricted: Pass, result: StreamedResult, keep: Callable[[Diagnostic], bool],
         seen: set[tuple[str, str]]) -> None:
    """Run ``restricted`` (``p`` on a part of the model); its stats are added to ``p``'s, its notes kept once."""
    program.current_pass, program.current_change = p.label(), p.change
    try:
        res = restricted.run(program, program.analyses)
    finally:
        program.current_pass = program.current_change = ""
    program.analyses.invalidate({"*"})
    stats = result.stats.setdefault(p.label(), {})
    for key, value in res.stats.items():
        stats[key] = stats.get(key, 0) + value if key in SUMMED else value
    for d in res.diagnostics:
        if keep(d) and (d.target, d.message) not in seen:
            seen.add((d.target, d.message))
            result.diagnostics.append(d)


def _write(module: nn.Module, prefix: str, parts: Parts, result: StreamedResult, exclude: tuple[str, ...] = ()) -> None:
    tensors, aliases, nonpersistent = tensors_to_write(module, exclude)
    full = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)  # noqa: E731
    parts.write({full(n): t for n, t in tensors.items()})
    result.aliases.update({full(a): full(b) for a, b in aliases.items()})
    result.nonpersistent += [full(n) for n in nonpersistent]
