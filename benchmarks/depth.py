"""Depth rewrites on all-MiniLM-L6-v2: drop vs replace (lstsq, cosine) vs replace + heal, and merge_layers on a CNN.

    .venv/bin/python benchmarks/depth.py                  # both tables, about 30 minutes on 2 idle cores
    .venv/bin/python benchmarks/depth.py --no-cnn --n 1,2 --heal-steps 100

**MiniLM table.** For n = 1, 2, 3 of the 6 encoder layers: ``drop_blocks(n)``, ``replace_blocks(n)``
(least squares), ``replace_blocks(n, method=cosine)`` and ``replace_blocks(n), heal(...)``. The span
is chosen by angular distance on the calibration split; calibration and evaluation texts are
disjoint standard-library docstrings. Printed per row: the span cut, parameters, mean cosine of
the sentence embeddings (mean pooling + L2 norm, as sentence-transformers does) to the original's,
the share of evaluation sentences whose nearest neighbour is unchanged, and the CPU latency ratio
to the original (batch 32 x 64 tokens, every model timed in turn in the same run, median).

**CNN table** (``merge_layers``). A small CNN (conv-BN-ReLU stages, 1x1 convs between 3x3 ones, a
two-layer head) is trained here on scikit-learn's bundled digits images; printed: test accuracy,
parameters, convs and ReLUs left, and CPU latency (batch 256, interleaved medians) for the original,
``merge_layers`` (exact: BatchNorm folded, the head's two Linears merged) and LayerMerge at latency
budgets 0.8 and 0.6, each also followed by ``heal``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

import torch
from torch import nn

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.infra.metrics import count_params
from graphopt.infra.text import markdown_table
from graphopt.models import load_model_spec
from graphopt.timing import interleaved_medians


def runner(model: nn.Module, inputs: dict[str, torch.Tensor]):
    def run() -> None:
        with torch.no_grad():
            model(**inputs)
    return run


def span_of(res: go.OptimizeResult) -> str:
    rec = next(r for r in res.report.records if "blocks_removed" in r.stats)
    start, n = int(rec.stats["start"]), int(rec.stats["blocks_removed"])
    return f"{start}" if n == 1 else f"{start}-{start + n - 1}"


def minilm_table(args: argparse.Namespace) -> None:
    model, example, tokenizer, description = load_model_spec("minilm")
    held = list(text_batches(tokenizer, stdlib_texts(args.eval_texts, seed=0, split="eval"), batch_size=32,
                             max_length=args.max_length))
    calib_texts = stdlib_texts(args.calib_texts or None, seed=0, split="calib")
    calib = list(text_batches(tokenizer, calib_texts, batch_size=16, max_length=args.max_length))
    reference = sentence_embeddings(model, held)
    heal = f"heal(steps={args.heal_steps},lr={args.heal_lr},{args.heal_options})"
    print(f"{description}; {len(calib_texts)} calibration / {args.eval_texts} held-out docstring texts "
          f"(disjoint), max {args.max_length} tokens; heal = {heal}\n")
    variants = []
    for n in [int(v) for v in args.n.split(",")]:
        variants += [(n, "drop", f"drop_blocks(n={n})"), (n, "replace lstsq", f"replace_blocks(n={n})"),
                     (n, "replace cosine", f"replace_blocks(n={n},method=cosine)")]
        if args.heal_steps > 0:
            variants.append((n, "replace lstsq + heal", f"replace_blocks(n={n}),{heal}"))
    rows, models = [], [model]
    for n, label, pipeline in variants:
        start = time.perf_counter()
        res = go.optimize(model, example, pipeline, calib=calib, measure=False, on_error="raise")
        seconds = time.perf_counter() - start
        cos, nn1 = embedding_agreement(reference, sentence_embeddings(res.model, held))
        rows.append([str(n), label, span_of(res), f"{count_params(res.model) / 1e6:.2f}M", f"{cos:.4f}",
                     f"{nn1:.3f}", "", f"{seconds:.0f}"])
        models.append(res.model)
        logging.info("%s: cos %.4f", pipeline, cos)
    probe = dict(tokenizer([" ".join(stdlib_texts(40, split="eval"))] * 32, truncation=True,
                           max_length=args.max_length, padding="max_length", return_tensors="pt"))
    times = interleaved_medians([runner(m, probe) for m in models], args.latency_runs, warmup=2)
    for row, t in zip(rows, times[1:]):
        row[6] = f"{t / times[0]:.3f}"
    shape = tuple(probe["input_ids"].shape)
    print(markdown_table(["n", "method", "blocks cut", "params", "mean cos", "NN@1 same", "latency", "time s"], rows))
    print(f"\nlatency: ratio to the original ({times[0] * 1e3:.1f} ms), batch {shape[0]} x {shape[1]} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.latency_runs} interleaved runs")
    print(f"original: {count_params(model) / 1e6:.2f}M parameters")


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stages with 1x1 convs between 3x3 ones (mergeable once their ReLU goes), a 2-layer head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(*stage(1, w, 3), *stage(w, w, 1), *stage(w, w, 3), *stage(w, w, 1),
                                      *stage(w, 2 * w, 3, 2), *stage(2 * w, 2 * w, 1), *stage(2 * w, 2 * w, 3),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * w, 32), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images), upsampled to 16x16; 80/20 split, fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def cnn_table(args: argparse.Namespace) -> None:
    """merge_layers on a CNN trained here on real images: exact, and LayerMerge at latency budgets (+ heal)."""
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    model = train(DigitsCNN(), xtr, ytr, args.epochs)
    calib = list(xtr.split(64))
    probe = xte[:args.cnn_batch]
    heal = f"heal(steps={args.cnn_heal_steps},lr=1e-3,loss=kl)"
    variants = [("merge_layers (exact)", "merge_layers")]
    for budget in (0.8, 0.6):
        variants.append((f"latency={budget}", f"merge_layers(latency={budget})"))
        variants.append((f"latency={budget} + heal", f"merge_layers(latency={budget}),{heal}"))
    print(f"\nDigitsCNN trained {args.epochs} epochs on {len(ytr)} of scikit-learn's digits (16x16), tested on "
          f"{len(yte)}; calibration = the training images; heal = {heal}\n")
    rows, models = [["original", f"{accuracy(model, xte, yte):.4f}", f"{count_params(model) / 1e3:.1f}k",
                     str(_count(model, nn.Conv2d)), str(_count(model, nn.ReLU)), "", "", "1.000"]], [model]
    for label, pipeline in variants:
        res = go.optimize(model, probe, pipeline, calib=calib, measure=False, on_error="raise")
        stats = next(r.stats for r in res.report.records if "layers_merged" in r.stats)
        rows.append([label, f"{accuracy(res.model, xte, yte):.4f}", f"{count_params(res.model) / 1e3:.1f}k",
                     str(_count(res.model, nn.Conv2d)), str(_count(res.model, nn.ReLU)),
                     f"{stats.get('predicted_latency', '')}", f"{stats.get('measured_latency', '')}", ""])
        models.append(res.model)
    times = interleaved_medians([runner(m, {"x": probe}) for m in models], args.latency_runs, warmup=3)
    for row, t in zip(rows, times):
        row[7] = f"{t / times[0]:.3f}"
    print(markdown_table(["variant", "test acc", "params", "convs", "ReLUs", "predicted", "pass-measured", "latency"], rows))
    print(f"\nlatency: ratio to the original ({times[0] * 1e3:.2f} ms), batch {args.cnn_batch} x 1 x 16 x 16, "
          f"{torch.get_num_threads()} threads, median of {args.latency_runs} interleaved runs; predicted = the "
          "DP's table-based prediction, pass-measured = measured by the pass right after merging")


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True, help="the MiniLM table")
    ap.add_argument("--cnn", action=argparse.BooleanOptionalAction, default=True, help="the merge_layers CNN table")
    ap.add_argument("--n", default="1,2,3", help="numbers of blocks to cut")
    ap.add_argument("--eval-texts", type=int, default=480)
    ap.add_argument("--calib-texts", type=int, default=0, help="0: the whole calibration split")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--heal-steps", type=int, default=400, help="0: no heal rows")
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--heal-options", default="freeze=*embeddings*,loss=cosine", help="more heal options")
    ap.add_argument("--latency-runs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=15, help="CNN training epochs")
    ap.add_argument("--cnn-batch", type=int, default=256, help="CNN latency batch")
    ap.add_argument("--cnn-heal-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "graphopt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.minilm:
        minilm_table(args)
    if args.cnn:
        cnn_table(args)


if __name__ == "__main__":
    main()
