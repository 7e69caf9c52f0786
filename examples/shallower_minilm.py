"""Make a sentence-embedding model shallower: one of its six layers replaced by a linear map.

User story: "My embedding model should have fewer layers and give nearly the same embeddings, with no
architecture-specific code." graphopt finds the layer stack, picks the layer whose input and output
are closest on real text, fits a linear map in its place (ReplaceMe) and heals the rest by
distillation. Dropping the same layer is shown for comparison. Calibration and evaluation sentences
are disjoint standard-library docstrings.

    python examples/shallower_minilm.py [--n 1] [--steps 100] [--out minilm-5]
"""

from __future__ import annotations

import argparse

import graphopt as go
from graphopt.data import stdlib_texts, text_batches
from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.models import load_model_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1, help="layers to cut")
    ap.add_argument("--steps", type=int, default=None, help="heal steps (0: no heal; default: its depth recipe's)")
    ap.add_argument("--out", default=None, help="directory to save the result to (safetensors + JSON)")
    args = ap.parse_args()

    model, example_inputs, tokenizer, description = load_model_spec("minilm")
    print(description)
    calib = list(text_batches(tokenizer, stdlib_texts(512, seed=0, split="calib"), batch_size=16, max_length=64))
    held_out = list(text_batches(tokenizer, stdlib_texts(256, seed=0, split="eval"), batch_size=32, max_length=64))
    reference = sentence_embeddings(model, held_out)

    heal = "" if args.steps == 0 else ",heal" + (f"(steps={args.steps})" if args.steps else "")
    for pipeline in (f"drop_blocks(n={args.n})", f"replace_blocks(n={args.n}){heal}"):
        result = go.optimize(model, example_inputs, pipeline, calib=calib, measure=False)
        cos, same = embedding_agreement(reference, sentence_embeddings(result.model, held_out))
        print(f"{pipeline}: mean cosine {cos:.4f}, nearest neighbour unchanged for {same:.1%} of sentences")
    print(result.report)  # the angular distance of every candidate span, and the one chosen

    if args.out:
        go.save(result, args.out)  # later: go.load(args.out, load_model_spec("minilm").model)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
