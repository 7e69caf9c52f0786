"""GPTQ through ``optimize`` on CUDA against the same run on CPU: time, agreement, and the CUDA model's speed.

    .venv/bin/python benchmarks/gptq_gpu.py              # on a machine with an NVIDIA GPU; about a minute
    .venv/bin/python benchmarks/gptq_gpu.py --cpu-only   # the CPU row alone (checks the script anywhere)

A Llama-shaped model with random weights (hidden 1024, 8 layers, SwiGLU 2816, 16 heads / 4 KV heads, vocabulary
32000), float32, calibrated on 16 random token sequences of 128, is quantized with
``quantize(scheme=int4,group_size=128,method=gptq)`` twice: the model and its calibration batches on the CPU,
then on the GPU. The table gives each run's wall time, the fraction of int4 codes the two runs share, and the
largest logit difference between the two quantized models on held-out tokens, relative to the logits' range
(float32 arithmetic in a different order on each device: a few codes at a rounding tie may flip). The GPU row
also gives the quantized model's forward time at batch 1 x 128 on the Triton backend against the float model.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
from torch import nn

import graphopt as go
from graphopt.infra.text import markdown_table

PIPELINE = "quantize(scheme=int4,group_size=128,method=gptq)"


def llama(device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(device)


def token_batches(n: int, seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 32000, (1, 128), generator=g).to(device)} for _ in range(n)]


def codes_of(model: nn.Module) -> dict[str, torch.Tensor]:
    from graphopt.nn.quant import QuantLinear

    return {name: m.qweight.cpu() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def gptq_on(device: torch.device) -> tuple[nn.Module, float]:
    model, calib = llama(device), token_batches(16, 0, device)
    start = time.perf_counter()
    res = go.optimize(model, calib[0], PIPELINE, calib=calib, measure=False, verify=False, on_error="raise")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return res.model, time.perf_counter() - start


def forward_ms(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    import triton.testing

    with torch.no_grad():
        return float(triton.testing.do_bench(lambda: model(**inputs), rep=200, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.cpu_only and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--cpu-only runs the CPU row)")
        return 0
    cpu = torch.device("cpu")
    cpu_model, cpu_s = gptq_on(cpu)
    print(f"  cpu: {cpu_s:.1f} s ({torch.get_num_threads()} threads)", flush=True)
    rows = [["cpu", f"{cpu_s:.1f}", "", "", "", ""]]
    if not args.cpu_only:
        gpu = torch.device("cuda")
        gpu_model, gpu_s = gptq_on(gpu)
        print(f"  cuda: {gpu_s:.1f} s", flush=True)
        a, b = codes_of(cpu_model), codes_of(gpu_model)
        same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(t.numel() for t in a.values())
        held = token_batches(1, 1, cpu)[0]
        with torch.no_grad():
            lc = cpu_model(**held).logits
            lg = gpu_model(**{k: v.to(gpu) for k, v in held.items()}).logits.cpu()
        rel = float((lc - lg).abs().max() / (lc.max() - lc.min()))
        float_model = llama(gpu).half()
        quant = copy.deepcopy(gpu_model).half()
        inputs = {k: v.to(gpu) for k, v in held.items()}
        try:
            speed = f"{forward_ms(float_model, inputs):.2f} / {forward_ms(quant, inputs):.2f}"
        except Exception as e:  # noqa: BLE001 - the timing's failure is the row's cell, not the end of the run
            speed = f"failed: {type(e).__name__}: {str(e)[:80]}"
        rows.append([torch.cuda.get_device_name(gpu), f"{gpu_s:.1f}", f"{cpu_s / gpu_s:.1f}", f"{same:.4f}",
                     f"{rel:.1e}", speed])
    print(f"\n{PIPELINE} on a Llama-shaped model (1024 hidden, 8 layers, random weights), 16 x 128 calibration "
          "tokens\n")
    print(markdown_table(["device", "GPTQ wall s", "speed-up", "codes shared with CPU",
                          "max logit diff / range", "fp16 forward ms float / int4 (1x128)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
