"""Weight-only quantization of all-MiniLM-L6-v2: quality, size and CPU latency, with onnxruntime's quantizer.

    .venv/bin/python benchmarks/quant.py                       # ~8 min on 2 cores
    .venv/bin/python benchmarks/quant.py --eval 256 --calib 128 --no-onnx

Rows: graphopt ``quantize`` at int8 per channel, int4 (group 128 and 32) by round-to-nearest and by
GPTQ, ternary; and, as the peer, onnxruntime's ``quantize_dynamic`` (int8 weights, per channel and
per tensor, int8 activations computed at run time) applied to the fp32 ONNX export. Calibration
(GPTQ) and evaluation use disjoint splits of standard-library docstrings (max length 64). Columns:
mean cosine of sentence embeddings (masked mean pooling + L2 norm) to the fp32 model's, the share of
sentences whose nearest neighbour is unchanged, the bytes of the quantized Linear weights (codes +
scales; embeddings stay fp32 everywhere), and latency as a ratio to the same runtime's fp32 model:
(a) batch 1 x 32 tokens on 1 thread, (b) batch 32 x 64 on 2 threads, medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.models import load_model_spec
from graphopt.nn.quant import QuantLinear

ROWS = [("int8 per channel, RTN", "quantize(scheme=int8,group_size=0)"),
        ("int4 g128, RTN", "quantize(scheme=int4,group_size=128)"),
        ("int4 g128, GPTQ", "quantize(scheme=int4,group_size=128,method=gptq)"),
        ("int4 g32, RTN", "quantize(scheme=int4,group_size=32)"),
        ("int4 g32, GPTQ", "quantize(scheme=int4,group_size=32,method=gptq)"),
        ("ternary, RTN", "quantize(scheme=ternary,group_size=0)")]


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def shaped(tokenizer: Any, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    text = " ".join(stdlib_texts(40, split="eval"))
    enc = tokenizer([text] * batch, truncation=True, max_length=tokens, padding="max_length", return_tensors="pt")
    return dict(enc)


def interleaved(runners: list[Any], repeat: int) -> list[float]:
    """Median seconds of each runner, run in turn ``repeat`` times after a warm-up."""
    for run in runners:
        run()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeat):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def torch_runner(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    def run() -> None:
        with torch.no_grad():
            model(**inputs)
    return run


def ort_session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v.numpy() for k, v in batch.items() if k in names}


def ort_embeddings(session: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for batch in batches:
        hidden = torch.from_numpy(session.run(["last_hidden_state"], ort_feed(session, batch))[0])
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=384, help="calibration sentences (GPTQ)")
    ap.add_argument("--eval", type=int, default=480, help="held-out sentences (the eval split has 486)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=12, help="timed runs per model and shape")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="the onnxruntime rows")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("graphopt", "transformers", "torch", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(0)

    model, example, tokenizer, description = load_model_spec("minilm")
    calib = list(text_batches(tokenizer, stdlib_texts(args.calib, split="calib"), batch_size=16,
                              max_length=args.max_length))
    held = list(text_batches(tokenizer, stdlib_texts(args.eval, split="eval"), batch_size=64,
                             max_length=args.max_length))
    reference = sentence_embeddings(model, held)
    small, large = shaped(tokenizer, 1, 32), shaped(tokenizer, 32, 64)
    print(f"{description}; {args.calib} calibration / {reference.shape[0]} held-out sentences (disjoint), "
          f"max length {args.max_length}; torch {torch.__version__}\n")

    rows = [("fp32 (torch)", "", 1.0, 1.0, linear_bytes(model), model)]
    for label, pipeline in ROWS:
        quantized = go.optimize(model, example, pipeline, calib=calib, measure=False, on_error="raise").model
        cos, agree = embedding_agreement(reference, sentence_embeddings(quantized, held))
        rows.append((label, pipeline, cos, agree, linear_bytes(quantized), quantized))
    models = [r[5] for r in rows]
    torch.set_num_threads(1)
    lat_a = interleaved([torch_runner(m, small) for m in models], args.repeat)
    torch.set_num_threads(2)
    lat_b = interleaved([torch_runner(m, large) for m in models], max(3, args.repeat // 4))

    print("| method | mean cos | NN@1 same | Linear weights MB | (a) 1x32, 1 thread | (b) 32x64, 2 threads |")
    print("|---|---|---|---|---|---|")
    for (label, _, cos, agree, size, _), a, b in zip(rows, lat_a, lat_b):
        print(f"| graphopt {label} | {cos:.4f} | {agree:.3f} | {size / 2**20:.2f} | {a / lat_a[0]:.2f} | "
              f"{b / lat_b[0]:.2f} |")
    print(f"\n(torch fp32: (a) {lat_a[0] * 1e3:.1f} ms, (b) {lat_b[0] * 1e3:.1f} ms)")
    if args.onnx:
        onnx_rows(model, held, reference, small, large, args.repeat, rows)


def onnx_rows(model: nn.Module, held: list, reference: torch.Tensor, small: dict, large: dict, repeat: int,
              rows: list) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = tempfile.mkdtemp(prefix="graphopt-quant-")
    fp32 = os.path.join(tmp, "fp32.onnx")
    axes = {k: {0: "batch", 1: "seq"} for k in small}
    go.export_onnx(copy.deepcopy(model), large, fp32, dynamic_axes=axes)
    files = [("onnxruntime fp32", fp32)]
    for per_channel in (True, False):
        path = os.path.join(tmp, f"dyn_{per_channel}.onnx")
        quantize_dynamic(fp32, path, per_channel=per_channel, weight_type=QuantType.QInt8)
        files.append((f"onnxruntime quantize_dynamic int8, {'per channel' if per_channel else 'per tensor'}", path))
    int8 = next(r for r in rows if r[0].startswith("int8"))[5]
    path = os.path.join(tmp, "graphopt_int8.onnx")
    go.export_onnx(int8, large, path, dynamic_axes=axes)
    files.append(("graphopt int8 per channel (its ONNX export: dequantize + MatMul)", path))
    lat_a, lat_b = [], []
    for threads, shape, out in ((1, small, lat_a), (2, large, lat_b)):
        sessions = [ort_session(p, threads) for _, p in files]
        out += interleaved([lambda s=s, x=shape: s.run(None, ort_feed(s, x)) for s in sessions], repeat)
    sessions = [ort_session(p, 2) for _, p in files]
    print("\n| method (onnxruntime) | mean cos | NN@1 same | file MB | (a) 1x32, 1 thread | (b) 32x64, 2 threads |")
    print("|---|---|---|---|---|---|")
    for (label, p), s, a, b in zip(files, sessions, lat_a, lat_b):
        cos, agree = embedding_agreement(reference, ort_embeddings(s, held))
        print(f"| {label} | {cos:.4f} | {agree:.3f} | {os.path.getsize(p) / 2**20:.1f} | {a / lat_a[0]:.2f} | "
              f"{b / lat_b[0]:.2f} |")
    print(f"\n(onnxruntime fp32: (a) {lat_a[0] * 1e3:.1f} ms, (b) {lat_b[0] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
