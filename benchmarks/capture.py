"""Capture and analysis time of the zoo models and of 7B- and 405B-shaped Llamas on the meta device.

    .venv/bin/python benchmarks/capture.py                 # every zoo model + Llama-7B and -405B shapes (meta)
    .venv/bin/python benchmarks/capture.py --models llama,vit --repeat 5 --llama-layers 8 --llama-405b-layers 0

Prints a markdown table: parameters, graph nodes (all / ops), build time, capture time
(``graphopt.capture()`` with torch.export, non-strict; best of ``--repeat`` runs after a warm-up), the time
of the dependency graph built on that capture (the ``dependency_graph`` analysis, best of the same runs) and
its share of the capture's, and the number of prunable groups it finds. Every model is built with its
default config, so the decoders (the meta Llamas too) have KV caches on.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import ZOO, hf_model, llama_meta


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _row(label: str, build: Callable[[], tuple[nn.Module, dict]], repeat: int) -> list[str]:
    start = time.perf_counter()
    model, inputs = build()
    built = time.perf_counter() - start
    times, analysed = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        program = go.capture(model, inputs)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        program.analyses.get("dependency_graph")
        analysed.append(time.perf_counter() - start)
    groups = len(program.dependency_groups)
    graph = program.analyses.get("exported").graph
    nodes = len(graph.nodes)
    ops = sum(1 for n in graph.nodes if n.op == "call_function")
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device.type
    return [label, _human(params), device, str(nodes), str(ops), f"{built:.2f}", f"{min(times):.2f}",
            f"{min(analysed):.2f}", f"{min(analysed) / min(times):.0%}", str(groups)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    parser.add_argument("--llama-layers", type=int, default=32, help="layers of the meta Llama-7B (0: skip it)")
    parser.add_argument("--llama-405b-layers", type=int, default=126,
                        help="layers of the meta Llama-405B shape (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3, help="captures per model; the best time is shown")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    go.capture(nn.Linear(2, 2), torch.randn(1, 2))  # warm-up: torch.export's one-time setup
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(_row(name, lambda n=name: hf_model(n), args.repeat))
    if args.llama_layers:
        rows.append(_row(f"llama-7b meta ({args.llama_layers} layers)",
                         lambda: llama_meta("7b", args.llama_layers), args.repeat))
    if args.llama_405b_layers:
        rows.append(_row(f"llama-405b meta ({args.llama_405b_layers} layers)",
                         lambda: llama_meta("405b", args.llama_405b_layers), args.repeat))

    header = ["model", "params", "device", "nodes", "ops", "build s", "capture s", "depgraph s", "of capture",
              "groups"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, best of {args.repeat}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
