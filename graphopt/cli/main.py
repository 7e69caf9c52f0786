"""The ``graphopt`` command: ``passes``, ``optimize`` and ``inspect``.

Exit status: 0 on success, 1 when a pass was rolled back or something unexpected failed, 2 on bad
input (unknown pass or option, a model spec that resolves to nothing, an unreadable calibration
file). Errors are one line on stderr (``-v`` adds the traceback); progress goes to stderr; the
report goes to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from ..progress import log as progress_log
from ..version import __version__
from .commands import cmd_inspect, cmd_optimize, cmd_passes
from .console import DEFAULT_CALIB_SIZE, DEFAULT_EVAL_SIZE, Console, UsageError

log = logging.getLogger(__name__)


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
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("optimize", help="run a pipeline on a model and print the report")
    p.add_argument("model", metavar="MODEL", help="minilm | HF model directory | module.path:factory")
    p.add_argument("-p", "--pipeline", default="default",
                   help="pipeline text or preset name (default: %(default)s); see 'graphopt passes'")
    p.add_argument("--goal", metavar="GOAL",
                   help="search for the pipeline instead of giving it, e.g. 'quality>=0.99,speedup>=2,"
                        "runtime=onnxruntime' (docs/search.md); prints every point measured and the front")
    p.add_argument("--front", metavar="FRONT.png", help="--goal: also draw the points and the Pareto front")
    p.add_argument("--calib", metavar="docstrings|FILE.txt",
                   help="calibration text: 'docstrings' (Python standard library docstrings) or a UTF-8 "
                        "file with one text per line; defaults to docstrings when a pass needs calibration")
    p.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help=f"number of calibration texts (default: every text of the source, at most "
                        f"{DEFAULT_CALIB_SIZE}: all 1928 of the docstrings' calibration split)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="calibration batch size (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, metavar="N",
                   help="truncate calibration texts to N tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which calibration texts are sampled (default: 0)")
    p.add_argument("--eval-size", type=int, default=DEFAULT_EVAL_SIZE, metavar="N",
                   help="held-out docstrings (disjoint from --calib docstrings) for the report's quality figure, "
                        "text models only (default: %(default)s; 0: the example inputs)")
    p.add_argument("-o", "--out", metavar="DIR", help="save the optimized model (safetensors + edit log)")
    p.add_argument("--onnx", metavar="FILE", help="export the optimized model to ONNX, checked in onnxruntime")
    p.add_argument("--dynamic", action="store_true",
                   help="--onnx with dynamic batch (and sequence, for token inputs) axes")
    p.add_argument("--onnx-quant-format", choices=("qdq", "matmulnbits"), default="qdq",
                   help="--onnx: how quantized layers are written (default: qdq, standard ONNX)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                   help="--onnx: onnxruntime's compute precision for 4-bit layers (0: float, 4: int8; default 0)")
    p.add_argument("--onnx-opset", type=int, default=None, metavar="N",
                   help="--onnx: ONNX opset (default 23: attention as one Attention node; 18 for older runtimes)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--plot", metavar="REPORT.png", help="also draw quality vs latency and size per pass "
                                                        "(needs matplotlib: pip install 'graphopt[plot]')")
    p.add_argument("--inplace", action="store_true",
                   help="optimize the loaded model without copying it first (halves peak memory)")
    p.add_argument("--stream", action="store_true",
                   help="read MODEL (a local HF directory) one block at a time and write --out as it goes: models "
                        "larger than memory; block-local passes (quantize rtn / gptq) and drop_blocks / "
                        "replace_blocks; docs/scale.md")
    p.add_argument("--memory-limit", type=float, metavar="GIB",
                   help="with --stream: a pipeline that needs the whole model runs on it in memory only within this "
                        "many GiB (default: the memory the system has available), else it is refused")
    p.add_argument("--no-verify", action="store_true", help="do not check outputs after each pass")
    p.add_argument("--no-measure", action="store_true", help="do not measure params/FLOPs/latency per pass")
    common(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("inspect", help="capture a model and print a summary of its graph")
    p.add_argument("model", metavar="MODEL", help="minilm | HF model directory | module.path:factory")
    p.add_argument("--depth", type=int, default=2, help="levels of the module tree to show (default: 2)")
    p.add_argument("--ops", type=int, default=None, metavar="N", help="show only the N most frequent ops")
    p.add_argument("--plot", metavar="GROUPS.png", help="also draw the prunable groups: which layers are coupled, "
                                                        "how many units each (needs matplotlib)")
    common(p)
    p.set_defaults(func=cmd_inspect)
    return parser


class _BarSafeHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``, so a line never breaks a progress bar on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


class _Format(logging.Formatter):
    """Progress lines as ``graphopt: [12:03:04] heal: ...``; other records with their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == progress_log.name:
            return f"graphopt: [{self.formatTime(record, '%H:%M:%S')}] {record.getMessage()}"
        return f"graphopt: {record.levelname}: {record.name}: {record.getMessage()}"


@contextmanager
def _logging_to(err: TextIO, verbose: int, quiet: bool = False) -> Iterator[None]:
    """Route graphopt's log records to ``err`` while the command runs; restore the loggers after.

    Progress lines (a line per pass, and every ``GRAPHOPT_PROGRESS_EVERY`` seconds of long work) are shown
    unless ``quiet``, so a log that is not a terminal still shows what runs; ``-v`` adds the rest at INFO.
    """
    logger = logging.getLogger("graphopt")
    handler = _BarSafeHandler(err)
    handler.setFormatter(_Format())
    old = logger.level, logger.propagate, progress_log.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    progress_log.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
        progress_log.setLevel(old[2])


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
    con = Console(out, err, quiet=args.quiet, verbose=args.verbose)
    try:
        with _logging_to(err, args.verbose, args.quiet):
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
        from ..frontend.errors import CaptureError

        if args.verbose:
            traceback.print_exc(file=err)
        if isinstance(e, CaptureError):  # its message is a diagnosis written for people
            print(f"graphopt: error: cannot capture {args.model}: {e}", file=err)
        else:
            hint = "" if args.verbose else " (run with -v for the traceback)"
            print(f"graphopt: error: {type(e).__name__}: {_one_line(e)}{hint}", file=err)
        return 1

