"""``factorize`` on all-MiniLM-L6-v2 and SmolLM2-135M: plain SVD vs ASVD vs whitened SVD, uniform vs global vs
directions ranks, with and without heal, whitened factors quantized with GPTQ, and the same budget spent by
``prune``.

    .venv/bin/python benchmarks/lowrank.py --model minilm --calib 512 --eval 256 --heal whiten-global \
        --allocations uniform global --quantize-allocation global  # 42 min
    .venv/bin/python benchmarks/lowrank.py --model minilm --calib 512 --eval 256 --methods whiten \
        --allocations directions --heal whiten-directions --quantize int8 int4 --quantize-ratios 0.2 --prune-ratios  # 15 min
    .venv/bin/python benchmarks/lowrank.py --model smollm2 --calib 64 --eval 32 --heal whiten-global --no-onnx \
        --heal-ratios 0.2 --quantize int4 --quantize-ratios 0.2 --prune-ratios 0.2 --repeat 10 \
        --allocations uniform global --quantize-allocation global  # 46 min
    .venv/bin/python benchmarks/lowrank.py --model minilm --heal all      # every row healed too (long)
    .venv/bin/python benchmarks/lowrank.py --rank-speed                   # why rank_multiple defaults to 8

Rows: ``factorize(ratio=r, method=m, allocation=a)`` for each ratio of the Linear weights removed (the LM head
stays dense), each with ``heal`` (its factorize recipe) where ``--heal`` says (default: the whitened rows),
the whitened rows of ``--quantize-allocation`` followed by ``quantize(method=gptq)`` at int8 and int4, and
``prune`` of the same share of FLOPs (Taylor scores across groups, readers refit) with and without heal. Calibration and held-out
data never overlap: MiniLM on docstrings of 64 tokens (mean cosine of sentence embeddings, the share of
held-out sentences whose nearest neighbour is unchanged); SmolLM2 on calibration docstrings of 128 tokens and
windows of 128 held-out tokens (perplexity ratio, next-token agreement). Weight MiB as stored; latency: the
candidate over the original, timed in turns (medians) in torch eager on 2 threads and, with ``--onnx``, in
onnxruntime on the exported files, at batch 1 and at a batched shape (MiniLM 32 x 64 tokens, SmolLM2 8 x 128);
a healed row has its unhealed row's shapes, so it is not timed again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.emit.onnx_verify import ort_runner
from graphopt.frontend.inputs import ExampleInputs, as_example_inputs
from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.infra.metrics import count_weight_bytes
from graphopt.infra.quality import summarize
from graphopt.infra.text import markdown_table
from graphopt.models import load_model_spec
from graphopt.timing import interleaved_medians
from graphopt.units import MIB

METHODS = ("svd", "asvd", "whiten")
ALLOCATIONS = ("uniform", "global", "directions")


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model_spec("minilm")
    tok = loaded.tokenizer
    calib = list(text_batches(tok, stdlib_texts(args.calib, split="calib"), batch_size=16, max_length=64))
    held = list(text_batches(tok, stdlib_texts(args.eval, split="eval"), batch_size=32, max_length=64))
    one = dict(tok(stdlib_texts(1, split="eval"), truncation=True, max_length=64, padding="max_length",
                   return_tensors="pt"))
    with torch.no_grad():
        reference = sentence_embeddings(loaded.model, held)

    def quality(model: torch.nn.Module) -> list[str]:
        cos, nn_agree = embedding_agreement(reference, sentence_embeddings(model, held))
        return [f"{cos:.4f}", f"{nn_agree:.3f}"]

    return {"model": loaded.model, "example": one, "batched": 32, "calib": calib, "quality": quality,
            "columns": ["cosine", "NN agree"]}


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from llm import windows

    loaded = load_model_spec("smollm2")
    tok = loaded.tokenizer
    calib = list(text_batches(tok, stdlib_texts(args.calib, split="calib"), batch_size=8, max_length=128))
    held = windows(tok, args.eval, 128)
    with torch.no_grad():
        reference = [summarize(loaded.model(**b), ExampleInputs((), b)) for b in held]

    def quality(model: torch.nn.Module) -> list[str]:
        from llm import quality as lm_quality

        _, agree, ratio = lm_quality(model, reference, held)
        return [f"{ratio:.3f}", f"{agree:.3f}"]

    example = {k: v[:1] for k, v in held[0].items()}
    return {"model": loaded.model, "example": example, "batched": 8, "calib": calib, "quality": quality,
            "columns": ["ppl ratio", "next-token agree"]}


def latency(original: torch.nn.Module, model: torch.nn.Module, example: dict, batches: list[int], onnx: bool,
            folder: Path, repeat: int) -> list[str]:
    """Original time over the candidate's at each batch size, in torch (2 threads) and, with ``onnx``, onnxruntime."""
    cells = []
    for batch in batches:
        inputs = as_example_inputs(example).with_batch(batch)

        def torch_run(m: torch.nn.Module, inputs: ExampleInputs = inputs) -> Any:
            def run() -> None:
                with torch.no_grad():
                    inputs.call(m)
            return run

        base, new = interleaved_medians([torch_run(original), torch_run(model)], repeat, warmup=2)
        cells.append(f"{base / new:.2f}")
        if onnx:
            paths = []
            for name, m in (("orig", original), ("cand", model)):
                path = folder / f"{name}.onnx"
                go.export_onnx(m, inputs, path, check=False)
                paths.append(path)
            base, new = interleaved_medians([ort_runner(p, model, inputs, 2) for p in paths], repeat, warmup=2)
            cells.append(f"{base / new:.2f}")
    return cells


def rows_to_run(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """``(pipeline, the row it shares shapes with, time it)`` in order."""
    rows: list[tuple[str, str, bool]] = []
    for ratio in args.ratios:
        for allocation in args.allocations:
            for method in args.methods:
                text = f"factorize(ratio={ratio:g},method={method},allocation={allocation})"
                rows.append((text, text, True))
                healed = args.heal == "all" or (args.heal == "whiten" and method == "whiten") or (
                    args.heal == f"whiten-{allocation}" and method == "whiten")
                if healed and ratio in (args.heal_ratios or args.ratios):
                    rows.append((f"{text},heal", text, False))
        whitened = f"factorize(ratio={ratio:g},method=whiten,allocation={args.quantize_allocation})"
        for scheme in args.quantize if ratio in (args.quantize_ratios or args.ratios) else ():
            rows.append((f"{whitened},quantize(scheme={scheme},method=gptq)", "", True))
        if ratio in (args.prune_ratios if args.prune_ratios is not None else args.ratios):
            cut = f"prune(target_flops={1 - ratio:g},importance=taylor,allocation=knapsack,reconstruct=true)"
            rows.append((cut, cut, True))
            rows.append((f"{cut},heal", cut, False))
    return rows


def rank_speed(threads: int) -> None:
    """Time a rank-r pair of a 384 -> 1536 layer at ranks around multiples of 8, on 2048 rows and on 32."""
    torch.set_num_threads(threads)
    table = []
    for ranks in ((56, 60, 63, 64), (120, 124, 127, 128), (184, 188, 191, 192)):
        for rows in (32, 2048):
            x = torch.randn(rows, 384)
            pairs = [torch.nn.Sequential(torch.nn.Linear(384, r, bias=False), torch.nn.Linear(r, 1536)) for r in ranks]

            def call(m: torch.nn.Module, x: torch.Tensor = x) -> Any:
                return lambda: m(x)

            with torch.no_grad():
                times = interleaved_medians([call(m) for m in pairs], 60, warmup=5)
            table.append([str(rows), *(f"r={r}: {t * 1e6:.0f} us" for r, t in zip(ranks, times))])
    print(markdown_table(["rows", "rank", "", "", ""], table))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS))
    ap.add_argument("--heal", choices=["none", *(f"whiten-{a}" for a in ALLOCATIONS), "whiten", "all"],
                    default="whiten", help="which rows are healed too (whiten-A: the whitened rows of allocation A)")
    ap.add_argument("--quantize", nargs="*", default=["int8", "int4"], help="schemes after whitened rows")
    ap.add_argument("--quantize-allocation", choices=ALLOCATIONS, default="directions",
                    help="the allocation of the whitened rows quantized")
    ap.add_argument("--heal-ratios", type=float, nargs="+", help="ratios with healed rows (default: all)")
    ap.add_argument("--quantize-ratios", type=float, nargs="+", help="ratios with quantized rows (default: all)")
    ap.add_argument("--prune-ratios", type=float, nargs="*", help="ratios with a prune row (default: all)")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="time in onnxruntime too")
    ap.add_argument("--calib", type=int, default=128, help="calibration docstrings")
    ap.add_argument("--eval", type=int, default=128, help="held-out docstrings (MiniLM) or windows (SmolLM2)")
    ap.add_argument("--repeat", type=int, default=20, help="timed rounds per latency figure")
    ap.add_argument("--rank-speed", action="store_true", help="only the rank-multiple timing table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.rank_speed:
        rank_speed(2)
        return
    setup = (minilm if args.model == "minilm" else smollm2)(args)
    original, example = setup["model"], setup["example"]
    base_bytes = count_weight_bytes(original)
    batches = [1, setup["batched"]]
    speed_cols = [f"{rt} b{b}" for b in batches for rt in (("torch", "ort") if args.onnx else ("torch",))]
    header = ["pipeline", *setup["columns"], "weight MiB", *speed_cols, "build s"]
    table: list[list[str]] = [["(original)", *setup["quality"](original), f"{base_bytes / MIB:.1f}",
                               *["1.00"] * len(speed_cols), "-"]]
    timed: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for text, twin, time_it in rows_to_run(args):
            start = time.perf_counter()
            try:
                model = go.optimize(original, example, text, calib=setup["calib"], measure=False,
                                    on_error="raise").model
            except Exception as e:  # noqa: BLE001 - a row that fails says why and the table goes on
                table.append([text, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"])
                print(markdown_table(header, table[-1:]), flush=True)
                continue
            built = time.perf_counter() - start
            speeds = latency(original, model, example, batches, args.onnx, Path(folder), args.repeat) \
                if time_it else timed.get(twin, ["-"] * len(speed_cols))
            if time_it:
                timed[text] = speeds
            table.append([text, *setup["quality"](model), f"{count_weight_bytes(model) / MIB:.1f}", *speeds,
                          f"{built:.0f}"])
            print(markdown_table(header, table[-1:]), flush=True)
    print()
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
