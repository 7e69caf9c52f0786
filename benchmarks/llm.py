"""What graphopt's passes do to a real LLM: SmolLM2-135M-Instruct (``load_model_spec("smollm2")``).

    .venv/bin/python benchmarks/llm.py                          # every graphopt row
    .venv/bin/python benchmarks/llm.py --rows int8,int4-g64 --windows 8
    make peers && .venv-peers/bin/python benchmarks/llm.py --rows int8,int4-g64-gptq,torchao-int8,nncf-int4-awq

Each row optimizes the original model with one pipeline and is measured against it on held-out text:
standard-library docstrings of the evaluation split (never the calibration split), concatenated and
tokenized, cut into ``--windows`` windows of ``--window`` tokens (GPTQ's tables use WikiText-2 windows the
same way).

Columns: perplexity of the original on those windows and the row's ratio to it (graphopt's report figure,
:func:`graphopt.infra.quality.task_quality`); next-token top-1 agreement with the original on every
position; greedy generation agreement: the share of ``--prompts`` prompts (first sentences of held-out
docstrings) whose ``--new-tokens`` greedy tokens are all the original's; MiB of all weights as held;
decode tokens/s at batch 1 and prefill latency of one ``--window``-token prompt (PyTorch eager on this
CPU, medians of interleaved runs: quantized layers run graphopt's torch reference here, see README
"Quantization" for the fast paths); the wall time of the optimization; and the process's peak resident
memory after the row (it only grows: a row's own peak shows where it raised it, so give the heal rows last).

The heal rows (``*-heal``, left out of the default run: about 15 minutes each on 2 cores) run the
language-model recipe heal picks by itself (KL on next-token distributions; docs/healing.md); run them at
a small and the full calibration set: ``--calib-texts 256`` and ``--calib-texts 0``.

SmolLM2's Linear weights were stored as Q4_1 (blocks of 32 along the input): int4 at group 32 aligned to
them is nearly lossless and proves little, so the int4 rows use group 64 and per channel.

Peer rows (where they install: ``make peers`` puts them in ``.venv-peers``), each with its documented
settings at the same group size: torchao ``quantize_`` with ``Int8WeightOnlyConfig`` and
``Int4WeightOnlyConfig(group_size=64)``; NNCF ``compress_weights`` (INT8_ASYM; INT4_SYM group 64, data-free and
with its data-aware AWQ + scale estimation on the calibration batches); optimum-quanto ``quantize`` + ``freeze``
(qint8, qint4 weights). A peer that fails on this model or this CPU is a row saying so. Two reference rows
need no peer: ``bf16`` and ``fp64``, the original cast to bfloat16 / float64 (how many greedy continuations a
change of precision alone keeps). llm-compressor's GPTQ
``oneshot`` is not here: its dependencies (vLLM's stack) do not install on this machine.
"""

from __future__ import annotations

import argparse
import copy
import logging
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.frontend.inputs import ExampleInputs
from graphopt.infra.metrics import count_weight_bytes
from graphopt.infra.quality import summarize, task_quality
from graphopt.infra.text import markdown_table
from graphopt.models import load_model_spec
from graphopt.timing import interleaved_medians
from graphopt.units import MIB

#: 20% of the parameters, from the MLPs only (SwiGLU channels, Taylor importance on calibration data): cutting the
#: hidden size or a third of the 3 key/value head groups costs far more (docs/pruning.md)
PRUNE20 = "prune(target_params=0.8,where=*.mlp.*,importance=taylor,reloadable=true)"
#: the same cut, each down_proj refit by least squares on 32 calibration batches (ranked on them too)
PRUNE20_REC = "prune(target_params=0.8,where=*.mlp.*,importance=taylor,reloadable=true,reconstruct=true,calib_batches=32)"

ROWS = {
    "int8": "quantize",
    "int8-gptq": "quantize(scheme=int8,method=gptq)",
    # the vocabulary projection too: SmolLM2's is tied to its embedding table, packed once and read by both
    "int8-head": "quantize(lm_head=true)",
    "int8-gptq-head": "quantize(scheme=int8,method=gptq,lm_head=true)",
    "int4-g64-gptq-b6-head": "quantize(scheme=int4,group_size=64,method=gptq,budget_bits=6,lm_head=true)",
    "int4-g64": "quantize(scheme=int4,group_size=64)",
    "int4-g64-gptq": "quantize(scheme=int4,group_size=64,method=gptq)",
    "int4-g0-gptq": "quantize(scheme=int4,group_size=0,method=gptq)",
    # mixed precision: the layers ranked by the probed-gradient estimate (default) or by measuring each one
    "int4-g64-gptq-b5": "quantize(scheme=int4,group_size=64,method=gptq,budget_bits=5)",
    "int4-g64-gptq-b6": "quantize(scheme=int4,group_size=64,method=gptq,budget_bits=6)",
    "int4-g64-gptq-b6-measured": "quantize(scheme=int4,group_size=64,method=gptq,budget_bits=6,sensitivity=measured)",
    "int4-default": "quantize(scheme=int4)",
    "w8a8": "quantize(scheme=w8a8)",
    "w8a8-token-gptq": "quantize(scheme=w8a8,activations=per_token,method=gptq)",
    "drop3": "drop_blocks(n=3)",
    "replace3": "replace_blocks(n=3)",
    "drop3-heal": "drop_blocks(n=3),heal",
    "replace3-heal": "replace_blocks(n=3),heal",
    "prune20": PRUNE20,
    "prune20-heal": f"{PRUNE20},heal",
    "prune20-rec": PRUNE20_REC,
    "prune20-rec-heal": f"{PRUNE20_REC},heal",
    "prune20-rec-heal300": f"{PRUNE20_REC},heal(steps=300)",
    "dyt": "dyt",
    "dyt-heal": "dyt,heal",
    "int4-g64-gptq-heal": "quantize(scheme=int4,group_size=64,method=gptq),heal",
    "w8a8-token-gptq-heal": "quantize(scheme=w8a8,activations=per_token,method=gptq),heal",
}

#: rows that run for minutes each (heal: 150 end-to-end steps of the 135M model): left out of the default run
SLOW_ROWS = ("drop3-heal", "replace3-heal", "prune20-heal", "prune20-rec-heal", "prune20-rec-heal300", "dyt-heal",
             "int4-g64-gptq-heal", "w8a8-token-gptq-heal", "int4-g64-gptq-b6-measured")


def torchao_row(bits: int) -> Callable[[nn.Module, list], nn.Module]:
    def run(model: nn.Module, calib: list) -> nn.Module:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=64)
        quantize_(model, config)
        return model
    return run


def nncf_row(mode: str, data_aware: bool = False) -> Callable[[nn.Module, list], nn.Module]:
    def run(model: nn.Module, calib: list) -> nn.Module:
        import nncf

        logging.getLogger("nncf").setLevel(logging.ERROR)
        kwargs: dict[str, Any] = {} if mode == "INT8_ASYM" else {"group_size": 64, "ratio": 1.0}
        if data_aware:
            kwargs.update(awq=True, scale_estimation=True)
        data = nncf.Dataset([dict(b) for b in (calib if data_aware else calib[:1])])
        return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), dataset=data, **kwargs)
    return run


def quanto_row(bits: int) -> Callable[[nn.Module, list], nn.Module]:
    def run(model: nn.Module, calib: list) -> nn.Module:
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights=qint8 if bits == 8 else qint4)
        freeze(model)
        return model
    return run


#: peer rows: name -> (what it runs, function of a copy of the model and the calibration batches)
PEERS: dict[str, tuple[str, Callable[[nn.Module, list], nn.Module]]] = {
    # not peers: the floor of "generations same". A bfloat16 copy of the weights, which users deploy as lossless,
    # already changes some greedy continuations of these prompts; float64 shows the float32 original's are stable
    "bf16": ("torch .to(torch.bfloat16), for reference", lambda model, calib: model.to(torch.bfloat16)),
    "fp64": ("torch .to(torch.float64), for reference", lambda model, calib: model.to(torch.float64)),
    "torchao-int8": ("torchao Int8WeightOnlyConfig", torchao_row(8)),
    "torchao-int4-g64": ("torchao Int4WeightOnlyConfig(group_size=64)", torchao_row(4)),
    "nncf-int8": ("NNCF compress_weights INT8_ASYM", nncf_row("INT8_ASYM")),
    "nncf-int4-g64": ("NNCF compress_weights INT4_SYM g64", nncf_row("INT4_SYM")),
    "nncf-int4-g64-awq": ("NNCF INT4_SYM g64, AWQ + scale estimation", nncf_row("INT4_SYM", data_aware=True)),
    "quanto-int8": ("optimum-quanto qint8 weights", quanto_row(8)),
    "quanto-int4": ("optimum-quanto qint4 weights", quanto_row(4)),
}


def peak_gib() -> float:
    """The process's peak resident memory so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def windows(tokenizer: Any, n: int, length: int) -> list[dict[str, torch.Tensor]]:
    """``n`` windows of ``length`` tokens of held-out text, one per batch row of batches of 4."""
    ids = tokenizer("\n\n".join(stdlib_texts(split="eval")), return_tensors="pt")["input_ids"][0]
    if ids.numel() < n * length:
        raise SystemExit(f"the held-out split has {ids.numel()} tokens, fewer than {n} x {length}")
    rows = ids[: n * length].reshape(n, length)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in rows.split(4)]


def prompts(tokenizer: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """The first sentence (at most 24 tokens) of ``n`` held-out docstrings, one prompt each."""
    texts = [t.split(". ")[0][:160] for t in stdlib_texts(n, seed=1, split="eval")]
    return [tokenizer(t, return_tensors="pt", truncation=True, max_length=24) for t in texts]


@torch.no_grad()
def greedy(model: nn.Module, prompt: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    out = model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, prompt["input_ids"].shape[1]:]


@torch.no_grad()
def quality(model: nn.Module, reference: list, held: list) -> tuple[float, float, float]:
    """(perplexity, next-token agreement, perplexity ratio to ``reference``'s summaries)."""
    pairs = [(summarize(model(**b), ExampleInputs((), b)), ref) for b, ref in zip(held, reference)]
    figure = task_quality(pairs)
    nll = torch.cat([p[0].nll for p in pairs])
    return float(nll.double().mean().exp()), figure.value, figure.extra["ppl ratio"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r not in SLOW_ROWS),
                    help=f"comma-separated rows of {', '.join(ROWS)} (default: all but {', '.join(SLOW_ROWS)}); "
                         f"peers: {', '.join(PEERS)}")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows")
    ap.add_argument("--window", type=int, default=128, help="tokens per window")
    ap.add_argument("--calib-texts", type=int, default=256,
                    help="calibration docstrings (GPTQ, SmoothQuant, depth, heal); 0: the whole split (1928)")
    ap.add_argument("--prompts", type=int, default=32, help="generation prompts")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=5)
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS and r not in PEERS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join([*ROWS, *PEERS])}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    loaded = load_model_spec("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    held = windows(tok, args.windows, args.window)
    texts = stdlib_texts(args.calib_texts or None, split="calib")
    calib = list(text_batches(tok, texts, batch_size=8, max_length=128))
    asks = prompts(tok, args.prompts)
    with torch.no_grad():
        reference = [summarize(model(**b), ExampleInputs((), b)) for b in held]
    answers = [greedy(model, p, args.new_tokens) for p in asks]
    base_ppl = float(torch.cat([r.nll for r in reference]).double().mean().exp())

    models: dict[str, tuple[str, nn.Module, float, float]] = {"original": ("", model, 0.0, peak_gib())}
    failed: list[list[str]] = []
    for row in args.rows.split(","):
        start = time.perf_counter()
        if row in ROWS:
            res = go.optimize(model, loaded.example_inputs, ROWS[row], calib=calib, measure=False, on_error="raise")
            models[row] = (ROWS[row], res.model, time.perf_counter() - start, peak_gib())
        else:
            label, run = PEERS[row]
            try:
                models[row] = (label, run(copy.deepcopy(model), calib[:16]), time.perf_counter() - start,
                               peak_gib())
            except Exception as e:  # noqa: BLE001 - a peer's failure is a row of the table, not the end of the run
                failed.append([row, label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"])
                print(f"{row}: {failed[-1][2]}", flush=True)
                continue
        print(f"{row}: optimized in {models[row][2]:.0f} s", flush=True)

    prefill = {"input_ids": held[0]["input_ids"][:1], "attention_mask": held[0]["attention_mask"][:1]}

    def prefill_run(m: nn.Module):
        return lambda: m(**prefill)

    def decode_run(m: nn.Module):
        return lambda: greedy(m, asks[0], args.new_tokens)

    with torch.no_grad():
        pre = interleaved_medians([prefill_run(m) for _, m, *_ in models.values()], args.latency_runs)
        dec = interleaved_medians([decode_run(m) for _, m, *_ in models.values()], args.latency_runs)
    table = []
    for (name, (pipeline, m, seconds, peak)), p, d in zip(models.items(), pre, dec):
        ppl, agree, ratio = quality(m, reference, held)
        same = sum(torch.equal(greedy(m, q, args.new_tokens), a) for q, a in zip(asks, answers)) / len(asks)
        table.append([name, pipeline or "-", f"{ppl:.3f}", f"{ratio:.4f}", f"{agree:.4f}", f"{same:.3f}",
                      f"{count_weight_bytes(m) / MIB:.1f}", f"{args.new_tokens / d:.1f}", f"{1000 * p:.0f}",
                      f"{seconds:.0f}" if pipeline else "-", f"{peak:.1f}"])
    print(f"\nSmolLM2-135M-Instruct; {args.windows} held-out windows of {args.window} tokens (original perplexity "
          f"{base_ppl:.3f}); {args.prompts} prompts x {args.new_tokens} greedy tokens; {len(texts)} "
          f"calibration docstrings; {args.threads} threads\n")
    table += [[row, label, why, *["-"] * 8] for row, label, why in failed]
    print(markdown_table(["row", "pipeline", "perplexity", "ppl ratio", "next-token agree", "generations same",
                          "weights MiB", "decode tok/s", "prefill ms", "time s", "peak RSS GiB"], table))


if __name__ == "__main__":
    main()
