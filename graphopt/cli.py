"""The ``graphopt`` command: ``passes``, ``optimize`` and ``inspect``.

Exit status: 0 on success, 1 when a pass was rolled back or something unexpected failed, 2 on bad
input (unknown pass or option, a model spec that resolves to nothing, an unreadable calibration
file). Errors are one line on stderr (``-v`` adds the traceback); progress goes to stderr; the
report goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import sys
import time
import traceback
import typing
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO, Union

from . import __version__

log = logging.getLogger(__name__)

DEFAULT_CALIB_SIZE = 64


class UsageError(Exception):
    """Bad input from the command line: reported in one line with exit status 2."""


class _Console:
    """Where the CLI writes: report on ``out``, progress and errors on ``err``."""

    def __init__(self, out: TextIO, err: TextIO, quiet: bool = False, verbose: int = 0) -> None:
        self.out, self.err, self.quiet, self.verbose = out, err, quiet, verbose

    def print(self, *parts: Any) -> None:
        print(*parts, file=self.out)

    @contextmanager
    def step(self, what: str, done: str = "") -> Iterator[None]:
        """``what ...`` on stderr, then the seconds it took: on the same line, or (when the step shows
        progress bars of its own) on a line ``done`` of its own."""
        if not self.quiet:
            print(f"{what} ...", end="\n" if done else "", file=self.err, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(f"{what} failed" if done else " failed", file=self.err, flush=True)
            raise
        if not self.quiet:
            took = f"{time.perf_counter() - start:.1f}s"
            print(f"{done} in {took}" if done else f" {took}", file=self.err, flush=True)


# --- graphopt passes ------------------------------------------------------------------------------

def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
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
    from .pass_infra import list_passes
    from .pipeline import format_value, list_presets

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
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = format_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = format_value(f.default_factory())
            else:
                default = "(required)"
            lines.append(f"      {f.name}: {_type_text(hints.get(f.name, Any))} = {default}")
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


def _cmd_passes(args: argparse.Namespace, con: _Console) -> int:
    con.print(describe_passes())
    return 0


# --- loading ----------------------------------------------------------------------------------------

def _parse_pipeline(text: str) -> Any:
    from .pass_infra import list_passes
    from .pipeline import PipelineError, parse_pipeline

    list_passes()  # registers the built-in passes and presets before the text is parsed
    try:
        return parse_pipeline(text)
    except PipelineError as e:
        raise UsageError(f"bad pipeline: {e}") from e


def _resolve(spec: str) -> Any:
    from .models import ModelSpecError, resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except ModelSpecError as e:
        raise UsageError(str(e)) from e


def _load(spec: str, resolved: Any, con: _Console) -> Any:
    from .models import ModelSpecError, load_model_spec

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


def _calibration(args: argparse.Namespace, loaded: Any, pipeline: Any, con: _Console) -> list[Any] | None:
    """Tokenised calibration batches from ``--calib`` (docstrings by default when a pass needs them)."""
    from .data import CorpusError, load_texts, text_batches

    needing = [p.name for p in pipeline if p.needs_calibration]
    source = args.calib
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
        if args.calib_size is None and source != "docstrings":  # a short file: all of it
            texts = load_texts(source, None, seed=args.seed)
            if len(texts) > DEFAULT_CALIB_SIZE:
                texts = load_texts(source, DEFAULT_CALIB_SIZE, seed=args.seed)
        else:
            texts = load_texts(source, args.calib_size or DEFAULT_CALIB_SIZE, seed=args.seed)
    except CorpusError as e:
        raise UsageError(str(e)) from e
    from tqdm.auto import tqdm

    total = math.ceil(len(texts) / args.batch_size)
    batches = text_batches(loaded.tokenizer, texts, args.batch_size, args.max_length)
    return list(tqdm(batches, total=total, desc=f"tokenising {len(texts)} texts", unit="batch",
                     file=con.err, disable=True if con.quiet else None, leave=False))


# --- graphopt optimize -----------------------------------------------------------------------------

def _check_onnx_available() -> None:
    if importlib.util.find_spec("graphopt.onnx_export") is None:
        raise UsageError("--onnx: ONNX export is not available in this graphopt installation")
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"--onnx needs {package}: pip install 'graphopt[onnx]'")


def _cmd_optimize(args: argparse.Namespace, con: _Console) -> int:
    from .optimize import optimize

    if args.calib_size is not None and args.calib_size < 1:
        raise UsageError(f"--calib-size must be at least 1, got {args.calib_size}")
    if args.batch_size < 1 or args.max_length < 2:
        raise UsageError("--batch-size must be at least 1 and --max-length at least 2")
    pipeline = _parse_pipeline(args.pipeline)  # a typo costs nothing: checked before the model loads
    if args.onnx:
        _check_onnx_available()
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    if args.calib not in (None, "docstrings") and not Path(args.calib).is_file():
        raise UsageError(f"--calib {args.calib}: no such file; give 'docstrings' or a text file with one "
                         f"sample per line")
    loaded = _load(args.model, _resolve(args.model), con)
    calib = _calibration(args, loaded, pipeline, con)
    with con.step(f"optimizing ({len(pipeline)} passes)", done="optimized"):
        result = optimize(loaded.model, loaded.example_inputs, pipeline, calib=calib, inplace=args.inplace,
                          verify=not args.no_verify, measure=not args.no_measure,
                          progress=False if con.quiet else None, model_spec=args.model)
    con.print(f"model: {loaded.description}")
    con.print(f"pipeline: {pipeline}")
    if calib is not None:
        con.print(f"calibration: {sum(_batch_len(b) for b in calib)} samples in {len(calib)} batches "
                  f"from {args.calib or 'docstrings'}")
    con.print("")
    con.print(str(result.report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(result.report.to_json() + "\n", encoding="utf-8")
        con.print(f"\nreport written to {args.json}")
    if args.out:
        with con.step(f"saving to {args.out}"):
            result.save(args.out)
        con.print(f"saved to {args.out} (load with graphopt.load(directory, base_model))")
    if args.onnx:
        with con.step(f"exporting ONNX to {args.onnx}"):
            exported = result.export_onnx(args.onnx, dynamic_axes="auto" if args.dynamic else None)
        con.print(str(exported))
    failed = result.report.failed
    if failed:
        names = ", ".join(r.text for r in failed)
        print(f"graphopt: {len(failed)} pass(es) rolled back: {names} (see the report)", file=con.err)
        return 1
    return 0


def _batch_len(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.shape[0]) if ids is not None else 1


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


def _cmd_inspect(args: argparse.Namespace, con: _Console) -> int:
    from .capture import capture

    if args.depth < 0:
        raise UsageError(f"--depth must be >= 0, got {args.depth}")
    loaded = _load(args.model, _resolve(args.model), con)
    with con.step("capturing with torch.export"):
        program = capture(loaded.model, loaded.example_inputs)
    try:
        from .inspect import summarize
    except ImportError:
        text = _minimal_summary(program)
    else:
        text = summarize(program, max_depth=args.depth, max_ops=args.ops)
    con.print(f"model: {loaded.description}")
    con.print(text)
    return 0


# --- entry point ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt", description="Compiler-style graph optimizer for PyTorch models.",
        epilog="MODEL is 'minilm' (the embedded all-MiniLM-L6-v2), a local HuggingFace model directory, "
               "or module.path:factory (file.py:factory) returning a model or (model, example_inputs).")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{passes,optimize,inspect}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log progress (-vv: debug) and show tracebacks on errors")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")

    p = sub.add_parser("passes", help="list every registered pass with its options, and the presets")
    common(p)
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("optimize", help="run a pipeline on a model and print the report")
    p.add_argument("model", metavar="MODEL", help="minilm | HF model directory | module.path:factory")
    p.add_argument("-p", "--pipeline", default="default",
                   help="pipeline text or preset name (default: %(default)s); see 'graphopt passes'")
    p.add_argument("--calib", metavar="docstrings|FILE.txt",
                   help="calibration text: 'docstrings' (Python standard library docstrings) or a UTF-8 "
                        "file with one text per line; defaults to docstrings when a pass needs calibration")
    p.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help=f"number of calibration texts (default: {DEFAULT_CALIB_SIZE}, or every line of a "
                        f"shorter file)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="calibration batch size (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, metavar="N",
                   help="truncate calibration texts to N tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which calibration texts are sampled (default: 0)")
    p.add_argument("-o", "--out", metavar="DIR", help="save the optimized model (safetensors + edit log)")
    p.add_argument("--onnx", metavar="FILE", help="export the optimized model to ONNX, checked in onnxruntime")
    p.add_argument("--dynamic", action="store_true",
                   help="--onnx with dynamic batch (and sequence, for token inputs) axes")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--inplace", action="store_true",
                   help="optimize the loaded model without copying it first (halves peak memory)")
    p.add_argument("--no-verify", action="store_true", help="do not check outputs after each pass")
    p.add_argument("--no-measure", action="store_true", help="do not measure params/FLOPs/latency per pass")
    common(p)
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("inspect", help="capture a model and print a summary of its graph")
    p.add_argument("model", metavar="MODEL", help="minilm | HF model directory | module.path:factory")
    p.add_argument("--depth", type=int, default=2, help="levels of the module tree to show (default: 2)")
    p.add_argument("--ops", type=int, default=None, metavar="N", help="show only the N most frequent ops")
    common(p)
    p.set_defaults(func=_cmd_inspect)
    return parser


@contextmanager
def _logging_to(err: TextIO, verbose: int) -> Iterator[None]:
    """Route graphopt's log records to ``err`` while the command runs; restore the logger after."""
    logger = logging.getLogger("graphopt")
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("graphopt: %(levelname)s: %(name)s: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or an argparse usage error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    con = _Console(out, err, quiet=args.quiet, verbose=args.verbose)
    try:
        with _logging_to(err, args.verbose):
            return args.func(args, con)
    except UsageError as e:
        if args.verbose:
            traceback.print_exc(file=err)
        print(f"graphopt: error: {e}", file=err)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=err)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        from .capture import CaptureError

        if args.verbose:
            traceback.print_exc(file=err)
        if isinstance(e, CaptureError):  # its message is a diagnosis written for people
            print(f"graphopt: error: cannot capture {args.model}: {e}", file=err)
        else:
            hint = "" if args.verbose else " (run with -v for the traceback)"
            print(f"graphopt: error: {type(e).__name__}: {_one_line(e)}{hint}", file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
