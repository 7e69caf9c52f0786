"""One-row (batch-1 decoding) latency of quantized layers under ``torch.compile`` on this CPU, layer by layer.

    .venv/bin/python benchmarks/decode_layers.py                  # SmolLM2-135M's shapes, 2 threads
    .venv/bin/python benchmarks/decode_layers.py --threads 1 --repeat 300

What ``graphopt.kernels.quant.one_row_linear`` is for: each row is one weight format on each linear shape of
SmolLM2-135M (hidden 576, MLP 1536, key/value 192, vocabulary 49152), and a gated MLP block (RMSNorm, gate,
up, SiLU, down) as in a decoder layer, where inductor fuses the normalization and the activation into the
quantized layers' loops. Each cell is a median over interleaved runs (``graphopt.timing``) of one compiled
call (``dynamic=False``, no freezing) with an input of one row, divided by the number of
copies the call runs (16 layers of a shape, summed; 2 of the vocabulary projection; 8 MLP blocks in a chain:
a call's own cost, ~70 us, would hide a small layer's), in microseconds, and its ratio to float32 layers
compiled the same way. Weights are random: the time does not depend on their values.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from graphopt.nn.quant import QuantLinear
from graphopt.timing import interleaved_medians

FORMATS = {"fp32": None, "int8": ("int8", 0), "int4 g64": ("int4", 64), "int4": ("int4", 0),
           "ternary g64": ("ternary", 64)}
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


def linear(k: int, n: int, fmt: tuple[str, int] | None) -> nn.Module:
    lin = nn.Linear(k, n, bias=False)
    return lin if fmt is None else QuantLinear.from_linear(lin.weight, None, scheme=fmt[0], group_size=fmt[1])


class GatedMLP(nn.Module):
    """RMSNorm, then ``down(silu(gate(h)) * up(h))``: the MLP half of a Llama decoder layer."""

    def __init__(self, hidden: int, inner: int, fmt: tuple[str, int] | None) -> None:
        super().__init__()
        self.gate, self.up, self.down = linear(hidden, inner, fmt), linear(hidden, inner, fmt), linear(inner, hidden, fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.down(F.silu(self.gate(h)) * self.up(h))


class Copies(nn.Module):
    """Several layers of one shape given the same input, their outputs summed (``chain``: each block's output
    is the next one's input)."""

    def __init__(self, layers: list[nn.Module], chain: bool = False) -> None:
        super().__init__()
        self.layers, self.chain = nn.ModuleList(layers), chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chain:
            for layer in self.layers:
                x = x + layer(x)
            return x
        return sum(layer(x) for layer in self.layers)


def compiled_call(module: nn.Module, k: int) -> Callable[[], object]:
    x = torch.randn(1, 1, k)
    module.eval()
    module(x)  # backend="auto" picks its eager paths first
    step = torch.compile(module, dynamic=False, fullgraph=True)
    step(x)
    return lambda: step(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = False
    cases = [(f"{k} -> {n}", k, 2 if n > 10000 else 16,
              lambda fmt, copies, k=k, n=n: Copies([linear(k, n, fmt) for _ in range(copies)])) for k, n in SHAPES]
    cases.append(("gated MLP 576 -> 1536 -> 576", 576, 8,
                  lambda fmt, copies: Copies([GatedMLP(576, 1536, fmt) for _ in range(copies)], chain=True)))
    print(f"One input row, torch.compile, {args.threads} threads; us (ratio to fp32)\n")
    print("| layer | " + " | ".join(FORMATS) + " |")
    print("|---" * (len(FORMATS) + 1) + "|")
    with torch.no_grad():
        for label, k, copies, build in cases:
            torch._dynamo.reset()
            runs = [compiled_call(build(fmt, copies), k) for fmt in FORMATS.values()]
            times = [t / copies for t in interleaved_medians(runs, args.repeat, warmup=5)]
            cells = [f"{t * 1e6:.0f} ({t / times[0]:.2f}x)" for t in times]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
