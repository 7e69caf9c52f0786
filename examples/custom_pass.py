"""Write your own passes: one as a class, one as a function, both used from a pipeline string.

* ``merge_linears`` (class form): merges two Linear layers with nothing non-linear between them
  (``y = W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)``) by module surgery, when that does not
  add parameters. Exact up to float rounding, so it keeps the default verification tolerance.
* ``op_census`` (function form): an analysis-only pass that counts the aten ops of the captured
  graph and reports the most frequent ones; it changes nothing and preserves every analysis.

Run: .venv/bin/python examples/custom_pass.py
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

import graphopt as go


@go.register_pass("merge_linears")
class MergeLinears(go.Pass):
    """Merge adjacent Linear layers of an nn.Sequential (Identity modules between allowed) into one Linear."""

    max_growth: float = 1.0  # merge only if params(merged) <= max_growth * params(pair)

    def run(self, program: go.Program, am: go.AnalysisManager) -> go.PassResult:
        result = go.PassResult(modified=False)
        for name, seq in list(program.named_modules()):
            if not isinstance(seq, nn.Sequential):
                continue
            # Indices of Linear layers, skipping Identity modules (e.g. left by remove_dropout).
            layers = [(i, m) for i, m in enumerate(seq) if not isinstance(m, nn.Identity)]
            for (i, first), (j, second) in zip(layers, layers[1:]):
                if not (type(first) is nn.Linear and type(second) is nn.Linear):
                    continue
                prefix = f"{name}." if name else ""
                pair = first.weight.numel() + second.weight.numel()
                merged_size = first.in_features * second.out_features
                if merged_size > self.max_growth * pair:
                    result.skip(f"{prefix}{i}+{j}", f"merging would grow {pair} weights to {merged_size}")
                    continue
                program.replace_module(f"{prefix}{i}", _merge(first, second))
                program.replace_module(f"{prefix}{j}", nn.Identity())
                result.modified = True
                result.stats["merged"] = result.stats.get("merged", 0) + 1
                break  # the Sequential changed under us; one merge per Sequential per run
        return result


def _merge(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    merged = nn.Linear(first.in_features, second.out_features,
                       bias=first.bias is not None or second.bias is not None)
    with torch.no_grad():
        merged.weight.copy_(second.weight @ first.weight)
        if merged.bias is not None:
            bias = second.bias.clone() if second.bias is not None else torch.zeros(second.out_features)
            if first.bias is not None:
                bias += second.weight @ first.bias
            merged.bias.copy_(bias)
    return merged


@go.register_pass("op_census")
def op_census(program: go.Program, am: go.AnalysisManager, *, top: int = 5) -> go.PassResult:
    """Count the aten ops of the captured graph (changes nothing)."""
    exported = am.get("exported")  # torch.export capture, cached by the analysis manager
    counts = Counter(str(n.target) for n in exported.graph.nodes if n.op == "call_function")
    result = go.PassResult(modified=False, preserved=go.PRESERVE_ALL)
    result.stats = {op: float(n) for op, n in counts.most_common(top)}
    return result


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.1), nn.Linear(64, 32), nn.ReLU(),
                                  nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).softmax(-1)


def main() -> None:
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(4, 16)
    print(go.get_pass("merge_linears").doc())

    pipeline = "remove_dropout,merge_linears,op_census(top=3)"
    result = go.optimize(model, x, pipeline=pipeline)
    print(result.report)
    print(f"\noptimized body: {result.model.body}")

    with torch.no_grad():
        print(f"output error vs the original model: {go.compare_outputs(result.model(x), model(x))}")
    # Pipelines round-trip through their text, custom passes included.
    assert str(go.parse_pipeline(str(result.pipeline))) == str(result.pipeline)


if __name__ == "__main__":
    main()
