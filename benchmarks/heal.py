"""Healing on all-MiniLM-L6-v2: each lossy change with no heal, heal's defaults, block-wise, progressive, LoRA.

    .venv/bin/python benchmarks/heal.py                     # both tables, about 3 hours (rows one after another)
    .venv/bin/python benchmarks/heal.py --changes dyt --modes none,default
    .venv/bin/python benchmarks/heal.py --no-quality        # the memory table only (a few minutes)

**Quality table.** Changes: ``dyt``; ``prune`` of 30% of the encoder's parameters (Taylor importance,
the demo's pipeline); ``replace_blocks(n=1)``; ``quantize(scheme=int4)``. Modes: ``none`` (the change
alone), ``default`` (``heal`` with no options: the recipe for that kind of change), ``blockwise``
(``heal(blockwise=100,steps=0)``: block-by-block reconstruction only), ``progressive`` (the pass's
``progressive=`` option, about as many heal steps in all as the default recipe; one unit for
``replace_blocks(n=1)``, so no row) and ``lora`` (``heal(lora=16)``, rank-16 adapters merged into the
weights; not after ``quantize``, whose layers hold integer codes). Calibration = the whole calibration
split of the standard-library docstrings; evaluation = held-out docstrings (disjoint). Printed: mean
cosine of the sentence embeddings (mean pooling + L2 norm, as sentence-transformers does) to the
original's, the share of evaluation sentences whose nearest neighbour is unchanged, wall time, and the
peak resident memory the optimisation added. Every row runs in a fresh process, so the memory figures
compare.

**Memory table.** BERT encoders with MiniLM's widths (384 hidden, 1536 FFN) and random weights, 6 / 12 /
24 layers, after ``dyt(mode=init)``: peak memory added by ``heal(blockwise=K,steps=0)`` and by the same
number of end-to-end steps (``heal(steps=K,blockwise=0)``), on the same calibration batches. Block-wise
healing holds one block's activations (and the hidden states of the calibration batches at one block
boundary), so its peak stays flat with depth while end-to-end backpropagation grows with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import warnings

from graphopt.infra.text import markdown_table

CHANGES = {
    "dyt": "dyt",
    "prune": "prune(target_params=0.8594,importance=taylor)",
    "replace": "replace_blocks(n=1)",
    "int4": "quantize(scheme=int4)",
}
PROGRESSIVE = {  # about as many heal steps in all as the change's default recipe
    "dyt": "dyt(progressive=170)",  # 7 units (the embeddings' norm, then 6 blocks): 1190 steps, the recipe's 1200
    "prune": "prune(target_params=0.8594,importance=taylor,progressive=70,rounds=3)",  # 210: 100 + 100 block-wise
    "int4": "quantize(scheme=int4,progressive=30)",  # 6 blocks, then the pooler: 210, the recipe's 200
}
MODES = ("none", "default", "blockwise", "progressive", "lora")
NOT_APPLICABLE = {("replace", "progressive"): "(one unit: same as default)",
                  ("int4", "lora"): "(no float Linear left: LoRA merges into float weights)"}


def pipeline_for(change: str, mode: str) -> str | None:
    """The pipeline of one row (None: the mode does not apply to the change, see NOT_APPLICABLE)."""
    base = CHANGES[change]
    if (change, mode) in NOT_APPLICABLE:
        return None
    if mode == "progressive":
        return PROGRESSIVE[change]
    return {"none": base, "default": f"{base},heal", "blockwise": f"{base},heal(blockwise=100,steps=0)",
            "lora": f"{base},heal(lora=16)"}[mode]


def child(args: list[str]) -> dict:
    """Run one measurement in a fresh process; returns its JSON result."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality_row(pipeline: str, opts: argparse.Namespace) -> dict:
    """(child) One pipeline on MiniLM: cosine, NN agreement, seconds, peak MiB."""
    import graphopt as go
    from graphopt.data import stdlib_texts, text_batches
    from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
    from graphopt.infra.metrics import PeakMemory
    from graphopt.models import load_model_spec

    model, example, tokenizer, _ = load_model_spec("minilm")
    held = list(text_batches(tokenizer, stdlib_texts(opts.eval_texts, seed=0, split="eval"), batch_size=32,
                             max_length=opts.max_length))
    calib = list(text_batches(tokenizer, stdlib_texts(opts.calib_texts or None, seed=0, split="calib"),
                              batch_size=16, max_length=opts.max_length))
    reference = sentence_embeddings(model, held)
    start = time.perf_counter()
    with PeakMemory() as peak:
        res = go.optimize(model, example, pipeline, calib=calib, measure=False, on_error="raise")
    seconds = time.perf_counter() - start
    cos, nn1 = embedding_agreement(reference, sentence_embeddings(res.model, held))
    heal = next((r.stats for r in reversed(res.report.records) if "loss_after" in r.stats), {})
    return {"cos": cos, "nn": nn1, "seconds": seconds, "peak_mb": peak.bytes / 2**20,
            "steps": heal.get("steps"), "best_step": heal.get("best_step"), "calib": len(calib)}


def memory_row(layers: int, mode: str, opts: argparse.Namespace) -> dict:
    """(child) Peak memory added by one heal on a random BERT encoder with ``layers`` layers, after dyt."""
    import torch
    from transformers import BertConfig, BertModel

    import graphopt as go
    from graphopt.frontend.inputs import as_example_inputs
    from graphopt.infra.metrics import PeakMemory
    from graphopt.infra.program import Program
    from graphopt.passes.heal.heal import Heal

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=layers,
                        vocab_size=30522)
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(1000, 30000, (16, opts.max_length), generator=g),
              "attention_mask": torch.ones(16, opts.max_length, dtype=torch.long)} for _ in range(opts.mem_batches)]
    # dyt(mode=init) needs no calibration run, whose activations the allocator would keep and the heal reuse
    student = go.optimize(model, calib[0], "dyt(mode=init)", measure=False, on_error="raise").model
    program = Program(student, as_example_inputs(calib[0]), calib=calib, original=model)
    k = opts.mem_steps
    heal = Heal(blockwise=k, steps=0, progress=False) if mode == "blockwise" else Heal(steps=k, blockwise=0,
                                                                                        progress=False)
    start = time.perf_counter()
    with PeakMemory() as peak:
        heal.run(program, program.analyses)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_mb": peak.bytes / 2**20, "seconds": time.perf_counter() - start, "weights_mb": weights / 2**20}


def quality_table(opts: argparse.Namespace) -> None:
    rows = []
    changes, modes = opts.changes.split(","), opts.modes.split(",")
    for mode, change in [(m, c) for m in modes for c in changes]:  # every change's default row comes early
        pipeline = pipeline_for(change, mode)
        if pipeline is None:
            rows.append([change, mode, NOT_APPLICABLE[change, mode], "", "", "", "", ""])
            continue
        try:
            r = child(["--row", pipeline, *opts.forward])
        except RuntimeError as e:  # one failing row is reported, the others still run
            logging.error("%s", e)
            rows.append([change, mode, pipeline, "failed", "", "", "", ""])
            continue
        steps = "" if r["steps"] is None else f"{r['steps']} (best {r['best_step']})"
        rows.append([change, mode, pipeline, f"{r['cos']:.4f}", f"{r['nn']:.3f}", steps, f"{r['seconds']:.0f}",
                     f"{r['peak_mb']:.0f}"])
        logging.info("%s: %s", pipeline, r)
        print(f"  {change:8} {mode:12} cos {r['cos']:.4f}  NN {r['nn']:.3f}  {r['seconds']:.0f} s  "
              f"steps {steps or '-'}  peak {r['peak_mb']:.0f} MiB", flush=True)  # a row as it lands
    print(f"\nall-MiniLM-L6-v2; calibration: the docstring calibration split, batches of 16, "
          f"evaluation: {opts.eval_texts} held-out docstrings, max {opts.max_length} tokens; "
          f"{opts.threads} threads\n")
    rows.sort(key=lambda row: (changes.index(row[0]), modes.index(row[1])))
    print(markdown_table(["change", "heal", "pipeline", "mean cos", "NN@1 same", "end-to-end steps", "time s",
                 "peak MiB"], rows))


def memory_table(opts: argparse.Namespace) -> None:
    rows = []
    for layers in [int(v) for v in opts.layers.split(",")]:
        got = {mode: child(["--memory", str(layers), mode, *opts.forward]) for mode in ("blockwise", "end-to-end")}
        rows.append([str(layers), f"{got['blockwise']['weights_mb']:.0f}", f"{got['blockwise']['peak_mb']:.0f}",
                     f"{got['end-to-end']['peak_mb']:.0f}", f"{got['blockwise']['seconds']:.0f}",
                     f"{got['end-to-end']['seconds']:.0f}"])
    print(f"\nrandom BERT encoders (384 hidden, 1536 FFN) after dyt(mode=init); {opts.mem_batches} calibration "
          f"batches of 16 x {opts.max_length} tokens; heal(blockwise={opts.mem_steps},steps=0) vs "
          f"heal(steps={opts.mem_steps}); peak resident memory added by the heal, fresh process each\n")
    print(markdown_table(["layers", "weights MiB", "block-wise peak MiB", "end-to-end peak MiB", "block-wise s",
                 "end-to-end s"], rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True, help="the MiniLM table")
    ap.add_argument("--memory", nargs=2, metavar=("LAYERS", "MODE"), help=argparse.SUPPRESS)  # (child)
    ap.add_argument("--row", help=argparse.SUPPRESS)  # (child)
    ap.add_argument("--memory-table", action=argparse.BooleanOptionalAction, default=True, help="the memory table")
    ap.add_argument("--changes", default=",".join(CHANGES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--eval-texts", type=int, default=480)
    ap.add_argument("--calib-texts", type=int, default=0, help="0: the whole calibration split")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--layers", default="6,12,24", help="memory table: encoder depths")
    ap.add_argument("--mem-batches", type=int, default=8)
    ap.add_argument("--mem-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    opts = ap.parse_args(argv)
    opts.forward = [f"--eval-texts={opts.eval_texts}", f"--calib-texts={opts.calib_texts}",
                    f"--max-length={opts.max_length}", f"--mem-batches={opts.mem_batches}",
                    f"--mem-steps={opts.mem_steps}", f"--threads={opts.threads}"]
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "graphopt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(opts.threads)
    if opts.row:
        print(json.dumps(quality_row(opts.row, opts)))
        return
    if opts.memory:
        print(json.dumps(memory_row(int(opts.memory[0]), opts.memory[1], opts)))
        return
    if opts.quality:
        quality_table(opts)
    if opts.memory_table:
        memory_table(opts)


if __name__ == "__main__":
    main()
