"""Replace every LayerNorm of a sentence-embedding model with DyT, then heal it by distillation.

User story: "My embedding model should run without normalisation statistics (elementwise layers
fuse into the surrounding ops and are cheap on any backend), and its embeddings must stay close
to the original ones." all-MiniLM-L6-v2 ships with graphopt's test dependencies; the text is
prose from Python's own docstrings (calibration and evaluation never share a sentence).

    python examples/dyt_minilm.py [--steps 200] [--out minilm-dyt]
"""

from __future__ import annotations

import argparse

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.helpers.quality import sentence_embeddings
from graphopt.models import load_model_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="distillation steps of heal (default: its DyT recipe's)")
    ap.add_argument("--out", default=None, help="directory to save the result to (safetensors + JSON)")
    args = ap.parse_args()

    model, example_inputs, tokenizer, description = load_model_spec("minilm")
    print(description)

    # Calibration data: any iterable of model inputs; here batches of real sentences.
    calib = list(text_batches(tokenizer, stdlib_texts(split="calib"), batch_size=32))  # ~1900 sentences
    held_out = list(text_batches(tokenizer, stdlib_texts(200, seed=0, split="eval"), batch_size=32))

    # 1. fit α, γ, β of each DyT layer to its LayerNorm's outputs (layer by layer, in execution order)
    # 2. distil the original model into the converted one (output + per-block feature losses)
    pipeline = "dyt(mode=calibrated),heal" + (f"(steps={args.steps})" if args.steps is not None else "")
    result = go.optimize(model, example_inputs, pipeline, calib=calib, measure=False)
    print(result.report)

    before, after = sentence_embeddings(model, held_out), sentence_embeddings(result.model, held_out)
    cosine = (before * after).sum(-1)
    print(f"held-out sentences: mean cosine to the original {cosine.mean():.4f} (worst {cosine.min():.4f})")

    if args.out:
        go.save(result, args.out)
        # later, without pickle: go.load(args.out, load_model_spec("minilm").model)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
