"""``optimize(model, goal=...)`` on MiniLM, EfficientNet-Lite0 or SmolLM2: the points, the front, the wall time, the peer.

    .venv/bin/python benchmarks/search.py                          # MiniLM, both goals of issue 28, ~6 min on 2 cores
    .venv/bin/python benchmarks/search.py --model effnet-lite0     # 2x on torch at top-1 agreement 0.98, ~4 min
    .venv/bin/python benchmarks/search.py --model smollm2 --calib 64 --eval 32   # smallest, fastest decode at ppl +5%
    .venv/bin/python benchmarks/search.py --goals "quality>=0.99,objective=size" --calib 64 --eval 64

For each goal (default: the issue's for ``--model``), the search (docs/search.md) over every pass that declares
choices, with heal as its repair step, on calibration and held-out data that never overlap (MiniLM: docstrings
of 64 tokens; EfficientNet-Lite0: views of the calibration photos and of four other photos; SmolLM2:
docstrings of 128 tokens, and windows of 128 held-out tokens for perplexity; its decode goal times greedy
``generate()`` of 16 tokens at batch 1 after the example prompt): every measured point, the best,
the search's wall time. The goals of one run share a cache of measured points (a temporary folder). MiniLM is
timed in onnxruntime on one docstring padded to 64 tokens at batch 1 and 32 on 1 and 2 threads, and beside it
runs the peer a user would pick: onnxruntime's ``quantize_dynamic`` (int8 weights per channel, activations at
run time; MatMul and Gather) on graphopt's fp32 export (the search's baseline, opset 23), its embedding cosine
on the same held-out docstrings and its speed-up at the same four settings. EfficientNet-Lite0's peers are
``vision.py``'s rows (same photos); SmolLM2's are ``llm.py``'s (torchao, NNCF, optimum-quanto: run with
``.venv-peers/bin/python``; a peer that is not installed is a row saying so), measured on the same windows.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.emit.onnx_verify import ort_runner
from graphopt.frontend.inputs import ExampleInputs, as_example_inputs
from graphopt.helpers.quality import sentence_embeddings
from graphopt.infra.metrics import count_weight_bytes
from graphopt.infra.quality import summarize
from graphopt.infra.text import markdown_table
from graphopt.models import load_model_spec
from graphopt.timing import interleaved_medians

GOALS = ("quality>=0.99,speedup>=3,runtime=onnxruntime,batches=[1,32],threads=[1,2]",
         "quality>=0.98,speedup>=4,runtime=onnxruntime,batches=[1,32],threads=[1,2]")


def padded(tokenizer, text: str, tokens: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer([text], truncation=True, max_length=tokens, padding="max_length", return_tensors="pt"))


def peer_row(model, example, held, goal: go.Goal, folder: Path) -> list[str]:
    """onnxruntime quantize_dynamic per channel on graphopt's fp32 export: cosine and worst speed-up."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sys.path.insert(0, str(Path(__file__).parent))
    from quant import ort_embeddings, ort_session

    fp32, q8 = folder / "fp32.onnx", folder / "q8.onnx"
    go.export_onnx(model, as_example_inputs(example).with_batch(2), fp32, dynamic_axes="auto")
    # MatMul and Gather only: quantize_dynamic turns opset 23's Attention into a QAttention onnxruntime refuses
    quantize_dynamic(fp32, q8, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
    with torch.no_grad():
        reference = sentence_embeddings(model, held)
    got = ort_embeddings(ort_session(str(q8), 2), held)
    cosine = float(torch.nn.functional.cosine_similarity(got, reference, dim=-1).mean())
    inputs, speedups = as_example_inputs(example), []
    for batch in goal.batches:
        for threads in goal.thread_counts():
            runs = [ort_runner(path, model, inputs.with_batch(batch), threads) for path in (fp32, q8)]
            base, new = interleaved_medians(runs, 10, warmup=2)
            speedups.append(base / new)
    return ["onnxruntime quantize_dynamic int8 per channel", f"{cosine:.4f}", f"{min(speedups):.2f}",
            " / ".join(f"{s:.2f}" for s in speedups)]


def llm_peer_rows(model, calib: list, held: list) -> list[list[str]]:
    """``llm.py``'s peer rows where they install (``make peers``): each peer's documented single configuration on
    a copy of SmolLM2, measured on the search's held-out windows: next-token agreement, perplexity ratio, size."""
    import copy

    sys.path.insert(0, str(Path(__file__).parent))
    from llm import PEERS, quality

    with torch.no_grad():
        reference = [summarize(model(**b), ExampleInputs((), b)) for b in held]
    base, rows = count_weight_bytes(model), []
    for name, (label, run) in PEERS.items():
        if name in ("bf16", "fp64"):  # references, not peers
            continue
        try:
            peer = run(copy.deepcopy(model), calib[:16])
        except Exception as e:  # noqa: BLE001 - a peer that does not install or run here is a row saying so
            rows.append([label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", "-", "-"])
            continue
        _, agree, ratio = quality(peer, reference, held)
        rows.append([label, f"{agree:.4f}", f"{ratio:.4f}", f"{count_weight_bytes(peer) / base:.3f}"])
    return rows


def minilm(args: argparse.Namespace) -> tuple[Any, Any, list, list]:
    """MiniLM, its calibration and held-out docstrings (64 tokens), and one docstring padded as the example."""
    loaded = load_model_spec("minilm")
    tok = loaded.tokenizer
    calib = list(text_batches(tok, stdlib_texts(args.calib, split="calib"), batch_size=16, max_length=args.tokens))
    held = list(text_batches(tok, stdlib_texts(args.eval, split="eval"), batch_size=32, max_length=args.tokens))
    return loaded.model, padded(tok, stdlib_texts(1, split="eval")[0], args.tokens), calib, held


def effnet(args: argparse.Namespace) -> tuple[Any, Any, list, list]:
    """EfficientNet-Lite0, views of the calibration photos and of the other, held-out photos."""
    loaded = load_model_spec("effnet-lite0")
    calib = loaded.batches("calib", args.calib, 16)
    held = loaded.batches("eval", args.eval, 32)
    return loaded.model, loaded.example_inputs[:1], calib, held


def smollm2(args: argparse.Namespace) -> tuple[Any, Any, list, list]:
    """SmolLM2-135M, calibration docstrings (128 tokens) and windows of 128 held-out tokens for perplexity."""
    sys.path.insert(0, str(Path(__file__).parent))
    from llm import windows

    loaded = load_model_spec("smollm2")
    tok = loaded.tokenizer
    calib = list(text_batches(tok, stdlib_texts(args.calib, split="calib"), batch_size=8, max_length=128))
    return loaded.model, loaded.example_inputs, calib, windows(tok, args.eval, 128)


#: model spec -> (its setup, the issue's goals for it)
MODELS: dict[str, tuple[Callable[[argparse.Namespace], tuple[Any, Any, list, list]], tuple[str, ...]]] = {
    "minilm": (minilm, GOALS),
    "effnet-lite0": (effnet, ("quality>=0.98,speedup>=2,runtime=torch,batches=[1,32],threads=[2]",)),
    "smollm2": (smollm2, ("ppl<=1.05,objective=size,heal=1,max_time=1500",
                          "ppl<=1.05,objective=speedup,decode=16,compile=true,batches=[1],threads=[2],heal=0,"
                          "max_time=1500")),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="minilm")
    ap.add_argument("--goals", nargs="+", help="goal texts (default: the issue's for --model)")
    ap.add_argument("--calib", type=int, default=128, help="calibration docstrings or photo views")
    ap.add_argument("--eval", type=int, default=128, help="held-out docstrings, photo views, or LM windows")
    ap.add_argument("--tokens", type=int, default=64, help="MiniLM's tokens per text")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cache", type=Path, help="keep the measured points in this folder (a rerun resumes from "
                                               "them; default: a temporary folder, every point measured afresh)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("graphopt.progress").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")

    setup, goals = MODELS[args.model]
    goals = args.goals or list(goals)
    model, example, calib, held = setup(args)
    with tempfile.TemporaryDirectory() as scratch:
        folder = str(args.cache or scratch)
        summary = []
        for text in goals:
            start = time.perf_counter()
            res = go.optimize_for(model, example, text, calib=calib, eval_data=held, cache=Path(folder))
            found = res.search
            print(f"\n{found}\n", flush=True)
            best = found.best
            summary.append([text, best.pipeline if best else f"none: {found.binding}",
                            f"{best.quality:.4f}" if best else "-", _num(best.ppl if best else None),
                            f"{best.speedup:.2f}" if best and best.speedup else "-",
                            " / ".join(f"{s:.2f}" for s in best.speedups.values()) if best else "-",
                            f"{best.size:.3f}" if best else "-", f"{time.perf_counter() - start:.0f}"])
        print(markdown_table(["goal", "best pipeline", "quality", "ppl ratio", "speed-up (worst)",
                              "per setting", "size", "search s"], summary))
        if args.peer and args.model == "smollm2":
            print("\npeers (llm.py's rows where they install), same held-out windows:\n")
            print(markdown_table(["peer", "next-token agreement", "ppl ratio", "size"],
                                 llm_peer_rows(model, calib, held)))
        if args.peer and args.model == "minilm":
            goal = go.Goal.parse(goals[0])
            print("\npeer, same held-out docstrings and settings:\n")
            print(markdown_table(["peer", "cosine", "speed-up (worst)", "b1 1t / b1 2t / b32 1t / b32 2t"],
                                 [peer_row(model, example, held, goal, Path(folder))]))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
