"""DyT on all-MiniLM-L6-v2: how close do sentence embeddings stay, and what does it cost or save on CPU?

Calibration and evaluation use disjoint real text (standard-library docstrings, ``graphopt.data``).
For ``init`` (the paper's swap), ``calibrated`` (α, γ, β fitted layer by layer) and
``calibrated+heal`` (then distilled from the original), the script prints the mean cosine between
the original and converted sentence embeddings (mean pooling + L2 norm, as sentence-transformers
does for this model) and the nearest-neighbour agreement (the share of evaluation sentences whose
nearest other sentence is the same under both models), then the CPU latency of the 13 norm layers
and of the whole model, LayerNorm vs DyT.

    python benchmarks/dyt.py                  # defaults finish in a few minutes on 2 cores
    python benchmarks/dyt.py --steps 400 --threads 4
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Any

import torch
from torch import nn

import graphopt as go
from graphopt.analysis.norms import is_norm_like
from graphopt.data import stdlib_texts, text_batches
from graphopt.frontend.inputs import ExampleInputs
from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.infra.metrics import measure_latency
from graphopt.infra.text import format_value
from graphopt.models import load_model_spec
from graphopt.nn.dyt import DyT

HEAL = "heal(steps={steps},lr={lr},features={features},warmup=20{freeze})"


def batches_by_length(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Batches of texts of similar token length (little padding), in a fixed order."""
    order = sorted(texts, key=lambda t: (len(tokenizer(t)["input_ids"]), t))
    return list(text_batches(tokenizer, order, batch_size=batch_size, max_length=max_length))




def norm_latency(model: nn.Module, inputs: dict, repeat: int) -> float:
    """Total median latency (ms) of the model's norm-like / DyT modules on their real inputs."""
    captured: dict[str, torch.Tensor] = {}
    names = [n for n, m in model.named_modules() if n and (isinstance(m, DyT) or is_norm_like(m))]
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, _n=n: captured.setdefault(_n, a[0].detach())) for n in names]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return sum(measure_latency(model.get_submodule(n), ExampleInputs((x,)), repeat=repeat) for n, x in
               captured.items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=0, help="calibration sentences (0: the whole split)")
    ap.add_argument("--eval", type=int, default=400, help="held-out evaluation sentences")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="heal steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="heal learning rate")
    ap.add_argument("--features", type=float, default=1.0, help="weight of the per-block feature loss")
    ap.add_argument("--freeze", default="", help="heal: glob of parameters kept fixed")
    ap.add_argument("--dyt", default="dyt", help="dyt pass text for the calibrated rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=20, help="latency repetitions")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, example, tokenizer, description = load_model_spec("minilm")
    calib = batches_by_length(tokenizer, stdlib_texts(args.calib or None, seed=0, split="calib"), args.batch,
                              args.max_length)
    held = batches_by_length(tokenizer, stdlib_texts(args.eval, seed=0, split="eval"), args.batch,
                             args.max_length)
    reference = sentence_embeddings(model, held)
    print(f"{description}; {sum(len(b['input_ids']) for b in calib)} calibration / {reference.shape[0]} held-out sentences "
          f"(disjoint), {torch.get_num_threads()} CPU threads\n")

    freeze = f",freeze={format_value(args.freeze)}" if args.freeze else ""
    heal = HEAL.format(steps=args.steps, lr=args.lr, features=args.features, freeze=freeze)
    rows, models = [], {}
    for label, pipeline in (("init", "dyt(mode=init)"), ("calibrated", args.dyt)):
        start = time.perf_counter()
        models[label] = go.optimize(model, example, pipeline, calib=calib, measure=False, on_error="raise").model
        rows.append((label, pipeline, *embedding_agreement(reference, sentence_embeddings(models[label], held)),
                     time.perf_counter() - start))
    # heal the calibrated model (the teacher is the original): same as optimize(model, ..., "dyt,heal")
    start = time.perf_counter()
    program = go.Program(copy.deepcopy(models["calibrated"]), example, calib=calib, original=model)
    go.PassManager(go.parse_pipeline(heal), measure=False, on_error="raise").run(program)
    models["calibrated+heal"] = program.module
    rows.append(("calibrated+heal", f"{args.dyt},{heal}", *embedding_agreement(reference, sentence_embeddings(program.module, held)),
                 rows[1][-1] + time.perf_counter() - start))
    width = max(len(r[1]) for r in rows)
    print(f"{'variant':<16} {'pipeline':<{width}} {'mean cos':>9} {'NN agree':>9} {'time s':>7}")
    for label, pipeline, cos, nn_agree, seconds in rows:
        print(f"{label:<16} {pipeline:<{width}} {cos:>9.4f} {nn_agree:>9.3f} {seconds:>7.1f}")

    probe = max(held, key=lambda b: b["input_ids"].numel())  # the largest held-out batch
    shape = tuple(probe["input_ids"].shape)
    print(f"\nCPU latency, batch {shape[0]} x {shape[1]} tokens, median of {args.repeat} runs (ms):")
    print(f"{'model':<12} {'13 norm layers':>15} {'whole model':>12}")
    for label, m in (("LayerNorm", model), ("DyT", models["calibrated+heal"])):
        norms = norm_latency(m, probe, args.repeat)
        whole = measure_latency(m, ExampleInputs((), probe), repeat=args.repeat, max_seconds=60.0)
        print(f"{label:<12} {norms:>15.2f} {whole:>12.1f}")


if __name__ == "__main__":
    main()
