"""Optimise a small BERT and ship it as a verified ONNX file with dynamic batch and sequence axes.

    python examples/export_onnx.py

The export is only reported as written after onnxruntime reproduced the torch outputs on the example
inputs and on inputs with other batch/sequence sizes; otherwise it raises OnnxVerificationError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import BertConfig, BertModel

import graphopt as go


def main() -> None:
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    model = BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 12)),
              "attention_mask": torch.ones(2, 12, dtype=torch.long)}

    result = go.optimize(model, inputs, pipeline="remove_dropout")
    print(result.report)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.onnx"
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        exported = result.export_onnx(path, dynamic_axes=axes)
        print(exported)

        # The file serves any batch/sequence size: run it on 3 sentences of 20 tokens.
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        ids = torch.randint(0, config.vocab_size, (3, 20))
        mask = torch.ones(3, 20, dtype=torch.long)
        hidden, pooled = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = result.model(input_ids=ids, attention_mask=mask)
        err = np.abs(hidden - ref.last_hidden_state.numpy()).max()
        print(f"onnxruntime on {list(ids.shape)}: last_hidden_state {list(hidden.shape)}, "
              f"pooler_output {list(pooled.shape)}, max abs error vs torch {err:.1e}")


if __name__ == "__main__":
    main()
