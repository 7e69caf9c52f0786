"""graphopt's Triton kernels for quantized layers on an NVIDIA GPU, against torch's fp16 / bf16 matmul (cuBLAS).

    .venv/bin/python benchmarks/kernels_gpu.py               # both tables, a few minutes on one GPU
    .venv/bin/python benchmarks/kernels_gpu.py --no-decode   # the kernel table only
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/kernels_gpu.py --dry-run   # tiny shapes on CPU: checks the script
    .venv/bin/python benchmarks/kernels_gpu.py --compile-only 90   # every kernel variant to sm_90 cubin, no GPU needed

**Kernel table.** For M = 1, 4, 16, 128, 4096 and (N, K) = (4096, 4096), (11008, 4096), (4096, 11008),
(8192, 8192): the time of ``x @ W.T`` with W in fp16 (``torch.nn.functional.linear``, cuBLAS) and with W
as graphopt's int8 per channel, int4 g128 / g32, ternary (2 bits) and w8a8 (int8 x int8, the
activation quantized per call), each captured in a CUDA graph (``triton.testing.do_bench_cudagraph``:
GPU time without Python's launch overhead), median; the speed-up over fp16; the memory bandwidth
achieved (bytes of weights, scales, input and output over the time) and its fraction of the device's
peak (the datasheet figure where the GPU is known, else the bandwidth of a 1 GiB device copy, said
which); and each kernel's error relative to the plain-torch reference on the same inputs.

**Decode table.** A Llama-3.2-1B-shaped model (2048 hidden, 8192 FFN, 16 layers, 32 heads with 8 KV
heads, 128256 vocabulary, tied LM head left in fp16) with random weights: tokens/s of greedy decoding
at batch 1, 128 new tokens after a 16-token prompt, in fp16, graphopt int4 g128, graphopt ternary and
torchao's int4 weight-only (where torchao installs). Each decode step runs as one CUDA graph over a
static KV cache, so the figure is the GPU's, not Python's; where graph capture fails the eager figure
is printed with the reason. Linear layers are replaced by QuantLinear with round-to-nearest codes
(what ``quantize(scheme=...)`` does without calibration), backend ``triton``.

Without a CUDA device (and without ``--dry-run``) the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphopt.infra.text import markdown_table

M_VALUES = (1, 4, 16, 128, 4096)
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))
FORMATS = {  # label: (scheme, group_size, activations)
    "int8": ("int8", 0, "none"),
    "int4 g128": ("int4", 128, "none"),
    "int4 g32": ("int4", 32, "none"),
    "ternary": ("ternary", 0, "none"),
    "w8a8": ("int8", 0, "per_tensor"),
}
#: datasheet memory bandwidth, GB/s, by a substring of torch.cuda.get_device_name()
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "A10G": 600, "A10": 600, "L40S": 864,
             "L4": 300, "RTX 4090": 1008, "RTX 3090": 936, "V100": 900, "T4": 320}
DRY_M, DRY_SHAPES = (1, 5, 33), ((96, 160),)


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """(GB/s, where it comes from): the datasheet's for known GPUs, else a measured device copy."""
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return float(gbps), f"datasheet ({name})"
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device) / 1e3
    return 2 * src.numel() / seconds / 1e9, f"measured 1 GiB copy ({name})"


def bench(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of ``fn``: a CUDA graph's replays on GPUs, wall time under the interpreter."""
    if device.type == "cuda":
        import triton.testing

        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot be captured is still timed, and said so
            logging.warning("CUDA graph capture failed (%s); timing with launches", e)
            return float(triton.testing.do_bench(fn, rep=50, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def layer_for(weight: torch.Tensor, label: str) -> nn.Module:
    from graphopt.nn.quant import QuantLinear

    scheme, group, activations = FORMATS[label]
    return QuantLinear.from_linear(weight, None, scheme=scheme, group_size=group, activations=activations,
                                   backend="triton")


def kernel_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    from graphopt.kernels.quant import quant_linear_reference

    peak, source = peak_bandwidth(device) if device.type == "cuda" else (float("nan"), "interpreter")
    labels = args.formats.split(",")
    rows = []
    for n, k in args.shapes:
        g = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
        layers = {label: layer_for(weight, label) for label in labels}
        for m in args.m:
            x = torch.randn(m, k, device=device, generator=g).to(dtype)
            with torch.no_grad():
                base = bench(lambda x=x, w=weight: torch.nn.functional.linear(x, w), device)
                io = (m * k + m * n) * x.element_size()
                rows.append([f"{n}x{k}", str(m), f"{str(dtype).removeprefix('torch.')} torch (cuBLAS on GPU)",
                             f"{base * 1e3:.1f}", "1.00", *bandwidth(n * k * x.element_size() + io, base, peak), ""])
                for label, layer in layers.items():
                    ms = bench(lambda layer=layer, x=x: layer(x), device)
                    want = quant_linear_reference(x.float(), layer.qweight, layer.scale.float(), layer.scheme,
                                                  layer.group_size, k, layer.activations)
                    err = float((layer(x).float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                    rows.append([f"{n}x{k}", str(m), label, f"{ms * 1e3:.1f}", f"{base / ms:.2f}",
                                 *bandwidth(layer.weight_bytes + io, ms, peak), f"{err:.1e}"])
            print(f"  {n}x{k} M={m}: " + ", ".join(f"{r[2]} {r[3]} us" for r in rows[-len(layers) - 1:]), flush=True)
    print(f"\nkernel time (us, median), speed-up over {rows[0][2]}, bandwidth achieved; peak {peak:.0f} GB/s "
          f"from {source}; error: max |kernel - torch reference| / max |reference|\n")
    print(markdown_table(["N x K", "M", "weights", "time us", "speed-up", "GB/s", "% of peak", "rel. error"], rows))


def bandwidth(nbytes: int, ms: float, peak: float) -> list[str]:
    gbps = nbytes / (ms / 1e3) / 1e9
    return [f"{gbps:.0f}", "" if peak != peak else f"{100 * gbps / peak:.0f}%"]


# --- decode ----------------------------------------------------------------------------------------------

def llama_1b(device: torch.device, dtype: torch.dtype, tiny: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256) if tiny else dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def quantize_linears(model: nn.Module, scheme: str, group: int) -> nn.Module:
    """Every Linear but the LM head as a round-to-nearest QuantLinear on the Triton backend (in place)."""
    from graphopt.nn.quant import QuantLinear

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full != "lm_head":
                setattr(module, child_name, QuantLinear.from_linear(
                    child.weight.data, child.bias, scheme=scheme, group_size=group, backend="triton"))
    return model


def torchao_int4(model: nn.Module) -> nn.Module | str:
    """torchao's int4 weight-only on its tinygemm kernel (``aten._weight_int4pack_mm``, bfloat16 only): its
    default packing needs the separate fbgemm-gpu-genai package."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as e:
        return f"torchao not installed ({e.name})"
    if next(model.parameters()).dtype != torch.bfloat16:
        return "torchao's tinygemm int4 kernel takes bfloat16 only: run with --dtype bfloat16"
    try:
        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    except Exception as e:  # noqa: BLE001 - the peer's failure is a row of the table, not the end of the run
        return f"torchao int4 failed: {type(e).__name__}: {str(e)[:120]}"
    return model


def decode_tokens_per_s(model: nn.Module, device: torch.device, prompt: int, new: int) -> tuple[float, str]:
    """Greedy decode at batch 1 over a static KV cache; each step one CUDA graph replay where it captures."""
    from transformers import StaticCache

    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)  # renamed in 5.x
    cache = StaticCache(config=model.config, max_cache_len=prompt + new + 2)
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device))
        token = out.logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt], device=device)

        def step() -> torch.Tensor:
            return model(input_ids=token, past_key_values=cache, cache_position=position).logits

        mode = "eager"
        if device.type == "cuda":
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = step()
                run, mode = graph.replay, "CUDA graph"
            except Exception as e:  # noqa: BLE001 - fall back to eager steps and say why
                mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:80]})"
        if mode != "CUDA graph":
            holder: dict[str, torch.Tensor] = {}

            def run() -> None:
                holder["logits"] = step()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(new):
            run()
            token.copy_((logits if mode == "CUDA graph" else holder["logits"])[:, -1:].argmax(-1))
            position += 1
        sync()
    return new / (time.perf_counter() - start), mode


def decode_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    variants: list[tuple[str, Callable[[nn.Module], nn.Module | str]]] = [
        (f"{str(dtype).removeprefix('torch.')}", lambda m: m),
        ("graphopt int4 g128 (triton)", lambda m: quantize_linears(m, "int4", 128)),
        ("graphopt ternary (triton)", lambda m: quantize_linears(m, "ternary", 0)),
        ("torchao int4 weight-only g128", torchao_int4),
    ]
    rows, base = [], None
    for label, make in variants:
        model = make(llama_1b(device, dtype, args.dry_run))
        if isinstance(model, str):
            rows.append([label, "", "", "", model])
            continue
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        tps, mode = decode_tokens_per_s(model, device, args.prompt, args.new_tokens)
        base = base or tps
        rows.append([label, f"{weights / 2**20:.0f}", f"{tps:.1f}", f"{tps / base:.2f}", mode])
        print(f"  {label}: {tps:.1f} tokens/s ({mode})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nLlama-3.2-1B-shaped model, random weights, batch 1, {args.prompt}-token prompt, {args.new_tokens} new "
          "tokens, greedy\n")
    print(markdown_table(["model", "weights MiB", "tokens/s", "vs first row", "decode steps"], rows))


#: --quick: (scheme, dtype, per_channel, scales after the dot, BLOCK_M), one of each unpacking and scale path
QUICK = {("int8", "fp16", True, True, 16), ("int4", "bf16", False, True, 16), ("int4", "fp16", False, False, 128),
         ("ternary", "fp32", True, True, 16)}


def compile_ahead(arch: int, quick: bool) -> int:
    """Compile the kernels for CUDA ``sm_{arch}`` without a GPU (Triton's bundled ptxas makes the cubin).

    Every format, activation dtype and scale path at a GEMV and a GEMM tile, and the int8 x int8 GEMM
    (``quick``: :data:`QUICK` and one int8 x int8 tile). Returns how many variants failed; each is printed
    with Triton's error.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from graphopt.kernels.quant_triton import SCHEME_IDS, _kernels

    weight_only, int8_gemm = _kernels(False)
    target, failed, done = GPUTarget("cuda", arch, 32), 0, 0
    ints = ("M", "N", "K", "group", "k_per_split", "stride_xm", "stride_wn", "stride_sn", "stride_ys", "stride_ym")
    variants = []
    for scheme, sid in SCHEME_IDS.items():
        for dt in ("fp16", "bf16", "fp32"):
            for per_channel, after in ((True, True), (False, True), (False, False)):
                for tile in ((16, 32, 128), (128, 128, 64)):
                    if quick and (scheme, dt, per_channel, after, tile[0]) not in QUICK:
                        continue
                    sig = {"X": f"*{dt}", "Wq": "*i8" if scheme == "int8" else "*u8", "S": f"*{dt}", "Y": "*fp32",
                           **dict.fromkeys(ints, "i32")}
                    consts = dict(SCHEME=sid, PER_CHANNEL=per_channel, SCALE_AFTER_DOT=after, IEEE=dt == "fp32",
                                  BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])
                    variants.append((f"{scheme} {dt} per_channel={per_channel} after_dot={after} tile={tile}",
                                     weight_only, sig, consts))
    int8_sig = {"A": "*i8", "Wq": "*i8", "AS": "*fp32", "AOFF": "*i32", "WS": "*fp16", "Y": "*fp16",
                **dict.fromkeys(("M", "N", "K", "stride_am", "stride_wn", "stride_ym"), "i32")}
    for tile in ((16, 64, 128), (128, 128, 64))[:1 if quick else 2]:
        variants.append((f"int8 x int8 tile={tile}", int8_gemm, int8_sig,
                         dict(BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])))
    for label, fn, sig, consts in variants:
        signature = {**sig, **dict.fromkeys(consts, "constexpr")}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
            done += "cubin" in compiled.asm
        except Exception as e:  # noqa: BLE001 - every failing variant is listed
            failed += 1
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"sm_{arch}: {done} of {len(variants)} kernel variants compiled to cubin, {failed} failed")
    return failed


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in pair.split("x")) for pair in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=None)
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="NxK,... e.g. 4096x4096,11008x4096")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--compile-only", type=int, metavar="ARCH", help="compile the kernels for sm_ARCH (80, 90, ...) "
                    "without a GPU, then exit (TRITON_INTERPRET unset)")
    ap.add_argument("--quick", action="store_true", help="--compile-only: one variant of each kind")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.compile_only:
        return 1 if compile_ahead(args.compile_only, args.quick) else 0
    if args.dry_run:
        from graphopt.kernels.quant_triton import interpreted

        if not interpreted():
            print("--dry-run runs the kernels on CPU under Triton's interpreter: set TRITON_INTERPRET=1")
            return 2
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter has no bf16, and fp16 CPU matmuls crawl
        args.m, args.shapes = args.m or list(DRY_M), args.shapes or list(DRY_SHAPES)
        args.new_tokens = min(args.new_tokens, 4)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: the GPU figures are still to be measured (benchmarks/README.md); "
                  "`--dry-run` with TRITON_INTERPRET=1 checks this script on CPU")
            return 0
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        args.m, args.shapes = args.m or list(M_VALUES), args.shapes or list(SHAPES)
        import triton

        print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}")
    if args.kernels:
        kernel_table(args, device, dtype)
    if args.decode:
        decode_table(args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
