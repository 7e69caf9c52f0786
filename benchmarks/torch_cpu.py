"""Quantized models served by PyTorch itself on this CPU: eager and ``torch.compile``, side by side with torchao.

    make peers && .venv-peers/bin/python benchmarks/torch_cpu.py                   # both models
    .venv/bin/python benchmarks/torch_cpu.py --models minilm --no-compile          # no peers, eager only

(1) all-MiniLM-L6-v2: latency of batch 1 x 32 tokens on 1 thread and batch 32 x 64 on 2 threads, as a ratio
to the fp32 model in eager mode, and the mean cosine of the sentence embeddings (held-out docstrings) to the
fp32 model's (computed on the eager model). (2) SmolLM2-135M-Instruct on 2 threads: greedy decode tokens/s at batch 1 (``--new-tokens``
new tokens after a short prompt, eager: HF ``generate``) and the latency of one ``--prefill``-token prompt,
both as ratios to fp32 eager, and next-token top-1 agreement with the fp32 model on held-out windows.

Rows: fp32 eager and compiled; graphopt ``quantize`` at int8 (weight-only, per channel), int4 (group 64),
w8a8 per tensor and per token, its layers on ``backend="auto"`` (the CPU path measured fastest for each
layer shape: ``graphopt.kernels.quant_dispatch``) and, for comparison, on ``backend="torch"`` (the
reference: dequantize, then a float matmul); torchao ``quantize_`` with ``Int8WeightOnlyConfig``,
``Int8DynamicActivationInt8WeightConfig`` and ``Int4WeightOnlyConfig(group_size=64)`` (its CPU layout) and
optimum-quanto's ``qint8`` and ``qint4`` weights, where they install and run (a row says why not). Compiled
rows (MiniLM) run ``torch.compile`` (inductor with freezing, dynamic=False) after one eager call, so that ``auto`` has picked its paths first; freezing
folds a weight-only row's dequantization into float32 constants (the note says so). Latencies are medians
of interleaved runs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt as go
from graphopt.compiled import compiled_decoder
from graphopt.data import stdlib_texts, text_batches
from graphopt.infra.text import markdown_table
from graphopt.kernels.quant_dispatch import candidates
from graphopt.models import load_model_spec
from graphopt.nn.quant import QuantLinear
from graphopt.timing import interleaved_medians

GRAPHOPT = {"int8": "quantize(scheme=int8)", "int4-g64": "quantize(scheme=int4,group_size=64)",
            "w8a8": "quantize(scheme=w8a8)", "w8a8-token": "quantize(scheme=w8a8,activations=per_token)",
            # LLMs: the vocabulary projection (SmolLM2's is tied to the embedding table) is a sixth of the weights
            "int8-head": "quantize(scheme=int8,lm_head=true)",
            "int4-g64-head": "quantize(scheme=int4,group_size=64,lm_head=true)",
            "w8a8-token-head": "quantize(scheme=w8a8,activations=per_token,lm_head=true)"}


def torchao(config: str) -> Callable[[nn.Module], nn.Module | str]:
    def build(model: nn.Module) -> nn.Module | str:
        try:
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
        except ImportError as e:
            return f"torchao not installed ({e.name}): make peers"
        configs: dict[str, Callable[[], Any]] = {
            "int8-wo": Int8WeightOnlyConfig, "int8-dyn": Int8DynamicActivationInt8WeightConfig,
            "int4-g64": lambda: _torchao_int4_cpu(Int4WeightOnlyConfig)}
        try:
            quantize_(model, configs[config]())
        except Exception as e:  # a peer that does not run here is a row saying so
            return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        return model
    return build


def quanto(weights: str) -> Callable[[nn.Module], nn.Module | str]:
    """optimum-quanto's weight-only quantization (``quantize`` then ``freeze``: integer weights in memory)."""
    def build(model: nn.Module) -> nn.Module | str:
        try:
            from optimum import quanto as oq
        except ImportError as e:
            return f"optimum-quanto not installed ({e.name}): make peers"
        try:
            oq.quantize(model, weights=getattr(oq, weights))
            oq.freeze(model)
        except Exception as e:  # a peer that does not run here is a row saying so
            return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        return model
    return build


def peer_rows(model: nn.Module) -> dict[str, nn.Module | str]:
    """torchao's int8 weight-only, int8 dynamic and int4 CPU rows, and optimum-quanto's int8 and int4 rows,
    each on its own copy of ``model``."""
    rows = {f"torchao {c}": torchao(c)(copy.deepcopy(model)) for c in ("int8-wo", "int8-dyn", "int4-g64")}
    rows.update({f"quanto {w}": quanto(w)(copy.deepcopy(model)) for w in ("qint8", "qint4")})
    return rows


def _torchao_int4_cpu(config: Any) -> Any:
    try:
        return config(group_size=64, int4_packing_format="opaque")  # torchao's CPU layout
    except TypeError:
        from torchao.dtypes import Int4CPULayout

        return config(group_size=64, layout=Int4CPULayout())


def graphopt_rows(model: nn.Module, example: Any, calib: list, names: list[str]) -> dict[str, nn.Module | str]:
    out: dict[str, nn.Module | str] = {}
    for name in names:
        result = go.optimize(model, example, GRAPHOPT[name], calib=calib, measure=False, progress=False)
        if not result.ok:
            out[f"graphopt {name}"] = "quantize was rolled back"
            continue
        out[f"graphopt {name}"] = result.model
        layers = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
        if all(candidates(m.scheme, m.group_size, m.activations) == ["torch"] for m in layers):
            continue  # auto has no other path to pick (int4, ternary): a reference row would repeat this one
        reference = copy.deepcopy(result.model)
        for layer in reference.modules():
            if isinstance(layer, QuantLinear):
                layer.backend = "torch"
        out[f"graphopt {name} (reference path)"] = reference
    return out


def timed(rows: dict[str, nn.Module | str], inputs: dict, threads: int, repeat: int, compile_too: bool
          ) -> dict[str, float]:
    """Median seconds of one call of each model row on ``threads`` threads, interleaved; with ``compile_too``
    each row again under ``torch.compile`` (inductor with freezing: the weights are constants, as torchao
    advises for CPU inference; the reference paths left out), timed in turn with the fp32 row in eager mode
    and reported scaled to the eager table's fp32 time. One compiled model at a time: dynamo keeps the
    graphs of every instance of a class in one cache and checks their guards in turn, so a dozen compiled
    copies of one model slow each other down. Inductor writes its kernels for the thread count it
    compiles with, so each is compiled after the threads are set."""
    torch.set_num_threads(threads)
    live = {k: m for k, m in rows.items() if not isinstance(m, str)}
    for m in live.values():  # auto times its paths on the first call, eagerly, before anything is compiled
        m(**inputs)
    out = dict(zip(live, interleaved_medians([lambda m=m: m(**inputs) for m in live.values()], repeat, warmup=2)))
    if not compile_too:
        return out
    torch._inductor.config.freezing = True
    for name, model in live.items():
        if "reference path" in name:
            continue
        torch._dynamo.reset()
        fast = torch.compile(model, dynamic=False)
        fast(**inputs)
        base, t = interleaved_medians([lambda: live["fp32"](**inputs), lambda f=fast: f(**inputs)], repeat, warmup=2)
        out[f"{name}, compiled"] = t / base * out["fp32"]
    torch._dynamo.reset()
    return out


@torch.no_grad()
def minilm(args: argparse.Namespace) -> None:
    model, example, tokenizer, description = load_model_spec("minilm")
    calib = list(text_batches(tokenizer, stdlib_texts(args.calib, split="calib"), batch_size=16, max_length=64))
    held = list(text_batches(tokenizer, stdlib_texts(args.eval, split="eval"), batch_size=64, max_length=64))
    text = " ".join(stdlib_texts(40, split="eval"))
    small, large = ({k: v for k, v in tokenizer([text] * b, truncation=True, max_length=t, padding="max_length",
                                                 return_tensors="pt").items()} for b, t in ((1, 32), (32, 64)))
    rows: dict[str, nn.Module | str] = {"fp32": model}
    encoder_rows = [n for n in GRAPHOPT if not n.endswith("-head")]  # an encoder has no LM head: moot there
    rows.update(graphopt_rows(model, example, calib, encoder_rows))
    if not args.no_peers:
        rows.update(peer_rows(model))
    reference = embeddings(model, held)
    lat_a = timed(rows, small, 1, args.repeat, not args.no_compile)
    lat_b = timed(rows, large, 2, max(3, args.repeat // 4), not args.no_compile)
    rows.update({name: rows[name.removesuffix(", compiled")] for name in lat_a if name not in rows})
    times = {name: (lat_a[name], lat_b[name]) for name in lat_a}
    table = []
    for name, m in rows.items():
        if isinstance(m, str):
            table.append([name, m, "-", "-", "-"])
            continue
        cos = F.cosine_similarity(embeddings(m, held), reference).mean()
        (a, b), (a0, b0) = times[name], times["fp32"]
        table.append([name, folded_note(name), f"{cos:.4f}", f"{a * 1e3:.2f} ms ({a / a0:.2f}x)", f"{b * 1e3:.1f} ms ({b / b0:.2f}x)"])
    print(f"\n{description}; {len(held)} held-out batches; latency ratios to fp32 eager\n")
    print(markdown_table(["row", "note", "mean cos", "(a) 1x32, 1 thread", "(b) 32x64, 2 threads"], table))


def folded_note(name: str) -> str:
    """Inductor's freezing treats weights as constants, so a weight-only row's dequantization is done once
    at compile time: the compiled model holds float32 weights (its speed is fp32's, and so is its memory)."""
    weight_only = name.endswith(", compiled") and "w8a8" not in name and "dyn" not in name and name != "fp32, compiled"
    return "dequantized at compile time: fp32 weights in memory" if weight_only else ""


def embeddings(model: nn.Module, batches: list) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = model(**b).last_hidden_state
        mask = b["attention_mask"][..., None].to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def smollm2(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    model, example, tokenizer, description = load_model_spec("smollm2")
    calib = list(text_batches(tokenizer, stdlib_texts(args.calib, split="calib"), batch_size=8, max_length=128))
    held = list(text_batches(tokenizer, stdlib_texts(args.eval, split="eval"), batch_size=8, max_length=128))
    text = " ".join(stdlib_texts(200, split="eval"))
    prefill = dict(tokenizer(text, truncation=True, max_length=args.prefill, return_tensors="pt"))
    prompt = dict(tokenizer("The quick brown fox", return_tensors="pt"))
    rows: dict[str, nn.Module | str] = {"fp32": model}
    rows.update(graphopt_rows(model, example, calib, args.llm_rows.split(",")))
    # bfloat16 activations: torch's packed int8 kernel (backend int8_mm) is fast for them, slow for float32
    rows["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    for name in [n for n in rows if n.startswith("graphopt") and "reference" not in n and "int8" in n]:
        if not isinstance(rows[name], str):
            rows[f"{name}, bf16"] = copy.deepcopy(rows[name]).to(torch.bfloat16)
    if not args.no_peers:
        rows.update(peer_rows(model))
    live = {k: m for k, m in rows.items() if not isinstance(m, str)}

    def decode(m: nn.Module) -> object:
        return m.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    for m in live.values():  # auto's timings (and any lazy setup) before anything is timed
        m(**prefill), decode(m)
    pre = interleaved_medians([lambda m=m: m(**prefill) for m in live.values()], args.repeat // 4 or 1)
    dec = interleaved_medians([lambda m=m: decode(m) for m in live.values()], args.repeat // 8 or 1)
    compiled = {} if args.no_compile else compiled_decode(live, lambda: decode(model), prompt["input_ids"], args)
    logits = [model(**b).logits for b in held]
    table = []
    for name, m in rows.items():
        if isinstance(m, str):
            table.append([name, m, "-", "-", "-", "-"])
            continue
        i = list(live).index(name)
        agree = torch.cat([(m(**b).logits.argmax(-1) == ref.argmax(-1))[b["attention_mask"].bool()]
                           for b, ref in zip(held, logits)]).float().mean()
        fast = "-"
        if isinstance(compiled.get(name), str):
            fast = compiled[name]
        elif name in compiled:
            ratio, same = compiled[name]
            fast = (f"{args.new_tokens * ratio / dec[0]:.1f} ({ratio:.2f}x, {ratio / compiled['fp32'][0]:.2f}x of "
                    f"fp32 compiled){'' if same else ', other tokens than eager'}")
        table.append([name, "", f"{agree:.4f}", f"{args.new_tokens / dec[i]:.1f} ({dec[0] / dec[i]:.2f}x)", fast,
                      f"{pre[i] * 1e3:.0f} ms ({pre[i] / pre[0]:.2f}x)"])
    print(f"\n{description}; 2 threads; decode {args.new_tokens} tokens at batch 1 (eager: HF generate; compiled: "
          f"static KV cache, one compiled graph a step); prefill {prefill['input_ids'].shape[1]} tokens; ratios to "
          "fp32 eager\n")
    print(markdown_table(["row", "note", "next-token agreement", "decode tokens/s", "decode tokens/s, compiled",
                          "prefill"], table))


def compiled_decode(live: dict[str, nn.Module], fp32_generate: Callable[[], object], prompt_ids: torch.Tensor,
                    args: argparse.Namespace) -> dict[str, tuple[float, bool] | str]:
    """``{row: (tokens/s as a ratio to fp32 eager generate, same tokens as the row's eager greedy decode)}`` for
    the fp32 row and the weight-only graphopt, torchao and optimum-quanto rows (a row that does not compile in
    one graph: why, as a string), each compiled in turn (without freezing, which
    would fold a weight-only layer's dequantization into float32 constants) and timed interleaved with fp32
    eager ``generate``."""
    torch._inductor.config.freezing = False
    out: dict[str, tuple[float, bool] | str] = {}
    for name, m in live.items():
        if name != "fp32" and ("w8a8" in name or "dyn" in name or "reference" in name or "bf16" in name):
            continue
        torch._dynamo.reset()
        run = compiled_decoder(m, prompt_ids, args.new_tokens, skip_module_guards=True)
        try:
            tokens = run()
        except Exception as e:  # a row that does not compile in one graph says so
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        eager = m.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        base, t = interleaved_medians([fp32_generate, run], args.repeat // 8 or 1)
        out[name] = (base / t, torch.equal(tokens, eager[:, prompt_ids.shape[1]:]))
    torch._dynamo.reset()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--calib", type=int, default=128, help="calibration docstrings (w8a8 ranges)")
    ap.add_argument("--eval", type=int, default=256, help="held-out docstrings")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--llm-rows", default="int8,int8-head,int4-g64,int4-g64-head,w8a8-token,w8a8-token-head",
                    help="graphopt rows of the SmolLM2 table")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    unknown = set(args.llm_rows.split(",")) - set(GRAPHOPT)
    if unknown:
        ap.error(f"unknown --llm-rows {sorted(unknown)}: choose among {sorted(GRAPHOPT)}")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in args.models.split(","):
        {"minilm": minilm, "smollm2": smollm2}[name](args)


if __name__ == "__main__":
    main()
