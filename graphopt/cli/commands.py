"""The ``graphopt`` subcommands: ``passes``, ``optimize`` and ``inspect``, and how they load models and data."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import typing
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from .console import DEFAULT_CALIB_IMAGES, DEFAULT_CALIB_SIZE, Console, UsageError

log = logging.getLogger(__name__)


# --- graphopt passes ------------------------------------------------------------------------------

def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        ranges = [str(e) for e in extras if type(e).__name__ == "Range"]
        return " ".join([_type_text(inner), *ranges])
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is Union or type(tp).__name__ == "UnionType":
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"[{_type_text(args[0])}]" if args else "[...]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _flag(cls: type, name: str) -> Any:
    """A class-level pass attribute; instance properties (e.g. depends on an option) read on a default instance."""
    value = getattr(cls, name, None)
    if isinstance(value, property):
        try:
            return getattr(cls(), name)
        except Exception:  # noqa: BLE001 - a pass that cannot be built with defaults
            return None
    return value


def describe_passes() -> str:
    """Every registered pass with its one-line doc, flags and options; then the presets."""
    from ..infra.options import option_help
    from ..infra.registry import list_passes, list_presets
    from ..infra.text import format_value

    lines = []
    for name, cls in list_passes().items():
        tags = []
        tolerance = _flag(cls, "tolerance")
        tags.append("lossy" if tolerance is None else f"tolerance {tolerance:g}")
        needs_calib = _flag(cls, "needs_calibration")
        depends = isinstance(getattr(cls, "needs_calibration", None), property)
        if needs_calib:
            tags.append("needs --calib" + (" with default options" if depends else ""))
        elif depends:
            tags.append("--calib with some options")
        if _flag(cls, "needs_original"):
            tags.append("uses the original model")
        lines.append(f"{name}  [{', '.join(tags)}]")
        lines.append(f"    {cls.doc() or '(no docstring)'}")
        hints, helps = typing.get_type_hints(cls, include_extras=True), option_help(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = format_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = format_value(f.default_factory())
            else:
                default = "(required)"
            rows.append((f"{f.name}: {_type_text(hints.get(f.name, Any))} = {default}", helps.get(f.name, "")))
        width = max((len(head) for head, _ in rows), default=0)
        lines += [f"      {head:<{width}}  {help_text}".rstrip() for head, help_text in rows]
    presets = list_presets()
    if presets:
        lines.append("")
        lines.append("presets:")
        width = max(len(n) for n in presets)
        lines += [f"  {n:<{width}} = {text}" for n, text in presets.items()]
    lines.append("")
    lines.append("pipeline syntax: name,name(option=value,...); e.g. "
                 "--pipeline 'remove_dropout,prune(ratio=0.3)'")
    return "\n".join(lines)


def cmd_passes(args: argparse.Namespace, con: Console) -> int:
    con.print(describe_passes())
    return 0


# --- loading ----------------------------------------------------------------------------------------

def _parse_pipeline(text: str) -> Any:
    from ..infra.pipeline import parse_pipeline
    from ..infra.registry import list_passes
    from ..infra.text import PipelineError

    list_passes()  # registers the built-in passes and presets before the text is parsed
    try:
        return parse_pipeline(text)
    except PipelineError as e:
        raise UsageError(f"bad pipeline: {e}") from e


def _resolve(spec: str) -> Any:
    from ..helpers.models import ModelSpecError, resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except ModelSpecError as e:
        raise UsageError(str(e)) from e


def _load(spec: str, resolved: Any, con: Console) -> Any:
    from ..helpers.models import ModelSpecError, load_model_spec

    if not con.verbose:
        _quiet_transformers()
    try:
        with con.step(f"loading {spec}"):
            return load_model_spec(resolved)
    except ModelSpecError as e:
        raise UsageError(str(e)) from e


def _quiet_transformers() -> None:
    """No per-tensor "Loading weights" bars from transformers (our step line shows the load)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _calibration(args: argparse.Namespace, loaded: Any, pipeline: Any, con: Console) -> list[Any] | None:
    """Tokenised calibration batches from ``--calib`` (docstrings by default when a pass needs them)."""
    from ..helpers.texts import CorpusError, load_texts, text_batches

    needing = [p.name for p in pipeline if p.needs_calibration]
    source = args.calib
    if loaded.tokenizer is None and loaded.batches is not None and source is None:
        if not needing:
            return None
        samples = args.calib_size or DEFAULT_CALIB_IMAGES
        log.info("calibration: %d samples of %s's own calibration split", samples, args.model)
        return loaded.batches("calib", samples, args.batch_size)
    if source is None and needing:
        if loaded.tokenizer is None:
            raise UsageError(f"{', '.join(needing)} needs calibration data, and {args.model} has no tokenizer "
                             f"to make it from text; use the Python API: go.optimize(..., calib=batches)")
        source = "docstrings"
        log.info("%s needs calibration data: using --calib docstrings", ", ".join(needing))
    if source is None:
        return None
    if loaded.tokenizer is None:
        raise UsageError(f"--calib needs a text model with a tokenizer, and {args.model} has none; "
                         f"for other models use the Python API: go.optimize(..., calib=batches)")
    try:
        if args.calib_size is None:  # every text, or a random DEFAULT_CALIB_SIZE of a longer source
            texts = load_texts(source, None, seed=args.seed)
            if len(texts) > DEFAULT_CALIB_SIZE:
                texts = load_texts(source, DEFAULT_CALIB_SIZE, seed=args.seed)
        else:
            texts = load_texts(source, args.calib_size, seed=args.seed)
    except CorpusError as e:
        raise UsageError(str(e)) from e
    from tqdm.auto import tqdm

    total = math.ceil(len(texts) / args.batch_size)
    batches = text_batches(loaded.tokenizer, texts, args.batch_size, args.max_length)
    return list(tqdm(batches, total=total, desc=f"tokenising {len(texts)} texts", unit="batch",
                     file=con.err, disable=True if con.quiet else None, leave=False))


def _held_out(args: argparse.Namespace, loaded: Any) -> list[Any] | None:
    """Held-out docstrings (the corpus's eval split, disjoint from calibration) for the quality figure, or the
    model's own held-out split (photo views) when it does not read text."""
    from ..helpers.texts import stdlib_texts, text_batches

    if args.eval_size == 0:
        return None
    if loaded.tokenizer is None:
        return loaded.batches("eval", args.eval_size, max(args.batch_size, 32)) if loaded.batches else None
    texts = stdlib_texts(args.eval_size, args.seed, "eval")
    return list(text_batches(loaded.tokenizer, texts, max(args.batch_size, 32), args.max_length))


# --- graphopt optimize -----------------------------------------------------------------------------

def _goal(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """``--goal`` parsed, and the passes its search may run (to know whether calibration data is needed)."""
    from ..infra.text import PipelineError
    from ..search import GoalError, as_goal
    from ..search.space import declared_space

    if not args.goal:
        if args.front:
            raise UsageError("--front draws a search: give --goal too")
        return None, []
    if args.pipeline != "default":
        raise UsageError("give --pipeline or --goal, not both (the search picks the pipeline)")
    try:
        goal = as_goal(args.goal)
        goal.check_runtime()
        space = declared_space(goal.passes, calibrated=True)
    except (GoalError, PipelineError) as e:
        raise UsageError(f"--goal: {e}") from e
    return goal, [p for slot in space.slots for p in slot.choices] + (space.repairs if goal.heal else [])


def _check_plot_available(path: str | None) -> None:
    if path and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'graphopt[plot]'")


def _check_onnx_available() -> None:
    if importlib.util.find_spec("graphopt.emit.onnx_export") is None:
        raise UsageError("--onnx: ONNX export is not available in this graphopt installation")
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"--onnx needs {package}: pip install 'graphopt[onnx]'")


def cmd_optimize(args: argparse.Namespace, con: Console) -> int:
    from ..frontend.inputs import as_example_inputs
    from ..infra.manager import PassRolledBackWarning
    from ..optimize import optimize

    if args.calib_size is not None and args.calib_size < 1:
        raise UsageError(f"--calib-size must be at least 1, got {args.calib_size}")
    if args.eval_size < 0:
        raise UsageError(f"--eval-size must be 0 (the example inputs) or more, got {args.eval_size}")
    if args.batch_size < 1 or args.max_length < 2:
        raise UsageError("--batch-size must be at least 1 and --max-length at least 2")
    pipeline = _parse_pipeline(args.pipeline)  # a typo costs nothing: checked before the model loads
    goal, searched = _goal(args)
    _check_plot_available(args.plot or args.front)
    if args.onnx:
        _check_onnx_available()
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    if args.calib not in (None, "docstrings") and not Path(args.calib).is_file():
        raise UsageError(f"--calib {args.calib}: no such file; give 'docstrings' or a text file with one "
                         f"sample per line")
    if args.stream:
        return _optimize_streamed(args, pipeline, con)
    if args.memory_limit is not None:
        raise UsageError("--memory-limit bounds a --stream run that needs the whole model: give --stream too")
    loaded = _load(args.model, _resolve(args.model), con)
    calib = _calibration(args, loaded, searched or pipeline, con)
    doing = f"searching for {goal}" if goal else f"optimizing ({len(pipeline)} pass{'' if len(pipeline) == 1 else 'es'})"
    with con.step(doing, done="optimized"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PassRolledBackWarning)  # the CLI says so itself, below the report
        result = optimize(loaded.model, loaded.example_inputs, "default" if goal else pipeline, calib=calib,
                          inplace=args.inplace,
                          verify=not args.no_verify, measure=not args.no_measure,
                          progress=False if con.quiet else None, model_spec=args.model,
                          eval_data=_held_out(args, loaded), goal=goal)
    con.print(f"model: {loaded.description}")
    if result.search is not None:
        con.print(str(result.search) + "\n")
        if args.front:
            result.search.plot(args.front)
            con.print(f"points and front drawn to {args.front}\n")
    con.print(f"pipeline: {result.pipeline}")
    if calib is not None:
        samples = sum(as_example_inputs(b).batch_size for b in calib)
        con.print(f"calibration: {samples} samples in {len(calib)} batches "
                  f"from {args.calib or 'docstrings'}")
    con.print("")
    con.print(str(result.report))
    if args.plot:
        with con.step(f"drawing the report to {args.plot}"):
            result.report.plot(args.plot)
        con.print(f"\nreport drawn to {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(result.report.to_json() + "\n", encoding="utf-8")
        con.print(f"\nreport written to {args.json}")
    if args.out:
        _save(result, loaded, args.out, con)
    if args.onnx:
        with con.step(f"exporting ONNX to {args.onnx}"):
            exported = result.export_onnx(args.onnx, dynamic_axes="auto" if args.dynamic else None,
                                          quant_format=args.onnx_quant_format, accuracy_level=args.accuracy_level,
                                          opset=args.onnx_opset)
        con.print(str(exported))
    failed = result.report.failed
    if failed:
        names = ", ".join(r.text for r in failed)
        print(f"graphopt: {len(failed)} pass(es) rolled back: {names} (see the report)", file=con.err)
        return 1
    return 0


def _optimize_streamed(args: argparse.Namespace, pipeline: Any, con: Console) -> int:
    """``--stream``: the pipeline run block by block on a local HF directory, written to ``--out``."""
    from ..helpers.loaded import LoadedModel
    from ..helpers.models import ModelSpecError, directory_inputs
    from ..stream import StreamError, optimize_streamed

    clashing = [flag for flag, given in (("--goal", args.goal), ("--onnx", args.onnx), ("--plot", args.plot),
                                          ("--json", args.json), ("--inplace", args.inplace)) if given]
    if clashing:
        raise UsageError(f"--stream writes the model block by block and keeps no model in memory to search, export "
                         f"or report on: drop {', '.join(clashing)} (load the result with graphopt.load to go on)")
    if not args.out:
        raise UsageError("--stream writes the result as it goes: give --out DIR")
    if not con.verbose:
        _quiet_transformers()
    try:
        example, tokenizer = directory_inputs(args.model)
    except ModelSpecError as e:
        raise UsageError(str(e)) from e
    calib = _calibration(args, LoadedModel(None, example, tokenizer, args.model), pipeline, con)  # type: ignore[arg-type]
    try:
        with con.step(f"streaming {args.model} one block at a time", done="optimized"):
            limit = None if args.memory_limit is None else int(args.memory_limit * 2**30)
            result = optimize_streamed(args.model, example, pipeline, calib=calib, out=args.out, memory_limit=limit)
    except StreamError as e:
        raise UsageError(str(e)) from e
    con.print(str(result))
    con.print(f"saved to {args.out} (load with graphopt.load(directory, base_model))")
    return 0


def _save(result: Any, loaded: Any, out: str, con: Console) -> None:
    """A directory plain transformers loads when the config describes the model, else graphopt's format."""
    from ..analysis.hf_config import is_hf_model, summarize
    from ..emit.compressed_tensors import is_quantized
    from ..emit.hf import loadability_problems, write_pretrained

    problems = loadability_problems(result.model) if is_hf_model(result.model) else None
    if problems == []:
        with con.step(f"saving to {out} (save_pretrained)"):
            write_pretrained(result.model, out, loaded.tokenizer)
        con.print(f"saved to {out}: config, weights{' and tokenizer' if loaded.tokenizer is not None else ''} "
                  f"(load with transformers' {type(result.model).__name__}.from_pretrained(directory)"
                  f"{'; quantized: needs the compressed-tensors package' if is_quantized(result.model) else ''})")
        return
    with con.step(f"saving to {out}"):
        result.save(out)
    why = f"; not as a transformers directory: {summarize(problems, 1)}" if problems else ""
    con.print(f"saved to {out} (load with graphopt.load(directory, base_model)){why}")


# --- graphopt inspect ------------------------------------------------------------------------------

def _minimal_summary(program: Any) -> str:
    exported = program.analyses.get("exported")
    nodes = list(exported.graph.nodes)
    ops = Counter(str(n.target) for n in nodes if n.op == "call_function")
    params = sum(p.numel() for p in program.module.parameters())
    lines = [f"{type(program.module).__name__}: {len(nodes)} graph nodes, {sum(ops.values())} ops, "
             f"{params:,} parameters", "ops by target:"]
    lines += [f"  {target}  {count}" for target, count in ops.most_common()]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace, con: Console) -> int:
    from ..infra.program import capture

    if args.depth < 0:
        raise UsageError(f"--depth must be >= 0, got {args.depth}")
    _check_plot_available(args.plot)
    loaded = _load(args.model, _resolve(args.model), con)
    with con.step("capturing with torch.export"):
        program = capture(loaded.model, loaded.example_inputs)
    try:
        from ..frontend.inspect import summarize
    except ImportError:
        text = _minimal_summary(program)
    else:
        text = summarize(program, max_depth=args.depth, max_ops=args.ops)
    con.print(f"model: {loaded.description}")
    con.print(text)
    if args.plot:
        from ..infra.plots import plot_groups

        with con.step(f"drawing the dependency groups to {args.plot}"):
            plot_groups(program.analyses.get("dependency_graph"), args.plot)
        con.print(f"\ngroups drawn to {args.plot}")
    return 0
