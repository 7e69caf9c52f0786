"""heal's defaults per kind of change: what earlier passes did decides the recipe.

The kind is read from the Program's edit log: each edit records the kind of change its pass declares
(``Pass.change``), so a model that went through ``dyt`` gets the DyT recipe, one that lost blocks the
depth recipe, and a user's pass that declares ``change="prune"`` the pruning recipe. Where several kinds
of change were made, the recipe of the one that needs the most healing is used (``depth`` > ``prune`` > ``factorize`` >
``quantize`` > ``dyt``); a kind without a recipe gets ``other``. Each recipe is the best one measured on
all-MiniLM-L6-v2 with disjoint calibration and held-out texts (``benchmarks/heal.py``); options given
explicitly to ``heal`` always win over the recipe.

Language models (an output ``*logits`` with a distribution at every position) have their own recipes
(:data:`LM_RECIPES`), measured on SmolLM2-135M-Instruct (``benchmarks/llm.py``): the objective is KL
on the next-token distributions, and a pretrained LM's weights take a 10x smaller learning rate than
the encoder's before its held-out loss rises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.infra.program import Program

#: the kinds of change with a recipe, in order of how much healing the change needs
SEVERITY = ("depth", "prune", "factorize", "quantize", "dyt")


@dataclass(frozen=True)
class Recipe:
    """Values for heal's options left unset (``None``)."""

    steps: int
    lr: float
    loss: str
    freeze: str
    blockwise: int
    features: float = 0.0
    lora_lr: float = 1e-3  # lr under heal(lora=r): adapters start at zero and need larger steps
    new_lr_scale: float = 1.0  # lr multiplier for the parameters earlier passes created (not under lora)


RECIPES: dict[str, Recipe] = {
    # blocks are gone: the remaining ones relearn their inputs; embeddings frozen, direction over scale;
    # where the block list keeps its length (replace_blocks(n=1)), per-block feature terms too
    "depth": Recipe(steps=1200, lr=2e-4, loss="cosine", freeze="*embeddings*", blockwise=0, features=1.0),
    # every block is narrower but still there: fit each block first, then a short end-to-end pass
    "prune": Recipe(steps=100, lr=1e-4, loss="auto", freeze="", blockwise=100),
    # every Linear is a low-rank pair: end to end at a lower lr (MiniLM, 20% cut, 512 docstrings: 0.9477 where
    # prune's block-wise recipe gave 0.9431)
    "factorize": Recipe(steps=300, lr=5e-5, loss="auto", freeze="", blockwise=0),
    # rounding error in every block: fitted block by block like pruning, then a short end-to-end pass
    "quantize": Recipe(steps=100, lr=1e-4, loss="auto", freeze="", blockwise=100),
    # every norm is replaced: the per-block feature terms guide each block's new elementwise layers
    "dyt": Recipe(steps=1200, lr=2e-4, loss="cosine", freeze="", blockwise=0, features=1.0, new_lr_scale=10.0),
    "other": Recipe(steps=200, lr=1e-4, loss="auto", freeze="", blockwise=0),
}


#: the recipes for language models (see the module docstring; numbers in docs/healing.md)
LM_RECIPES: dict[str, Recipe] = {
    # blocks are gone: every other weight relearns end to end on the next-token distributions
    "depth": Recipe(steps=150, lr=2e-5, loss="kl", freeze="*embed*", blockwise=0),
    # narrower MLPs / fewer heads: the same, at a larger lr (the damage is larger)
    "prune": Recipe(steps=150, lr=5e-5, loss="kl", freeze="*embed*", blockwise=0),
    # low-rank pairs everywhere: as pruning, every weight relearns end to end on the next-token distributions
    "factorize": Recipe(steps=150, lr=5e-5, loss="kl", freeze="*embed*", blockwise=0),
    # the encoder's schedule at the LM learning rate: SmolLM2 w8a8 per token x1.0155 -> x1.0077, int4 g64 x1.118 -> x1.083
    "quantize": Recipe(steps=100, lr=2e-5, loss="kl", freeze="", blockwise=100),
    # the encoder's DyT recipe (feature terms, new layers at 10x) at the LM learning rate
    "dyt": Recipe(steps=150, lr=2e-5, loss="kl", freeze="*embed*", blockwise=0, features=1.0, new_lr_scale=10.0),
    "other": Recipe(steps=150, lr=2e-5, loss="kl", freeze="", blockwise=0),
}


def is_language_model(outputs: dict[str, torch.Tensor]) -> bool:
    """The outputs hold logits with a distribution at every position (``(batch, positions, vocabulary)``)."""
    return any(k.rsplit(".", 1)[-1].endswith("logits") and v.dim() == 3 for k, v in outputs.items())


#: heal's options a recipe fills in when they are left unset (None)
FILLED = ("steps", "lr", "loss", "freeze", "blockwise", "features", "new_lr_scale")


def change_kind(program: Program) -> str:
    """The kind of change earlier passes made to ``program`` (a key of :data:`RECIPES`)."""
    made = {edit.kind for edit in program.edits if edit.kind}
    return next((kind for kind in SEVERITY if kind in made), "other")
