"""heal's defaults per kind of change: what earlier passes did decides the recipe.

The kind is read from the Program's edit log: each edit records the kind of change its pass declares
(``Pass.change``), so a model that went through ``dyt`` gets the DyT recipe, one that lost blocks the
depth recipe, and a user's pass that declares ``change="prune"`` the pruning recipe. Where several kinds
of change were made, the recipe of the one that needs the most healing is used (``depth`` > ``prune`` >
``quantize`` > ``dyt``); a kind without a recipe gets ``other``. Each recipe is the best one measured on
all-MiniLM-L6-v2 with disjoint calibration and held-out texts (``benchmarks/heal.py``); options given
explicitly to ``heal`` always win over the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.infra.program import Program

#: the kinds of change with a recipe, in order of how much healing the change needs
SEVERITY = ("depth", "prune", "quantize", "dyt")


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
    # rounding error in every block: fitted block by block like pruning, then a short end-to-end pass
    "quantize": Recipe(steps=100, lr=1e-4, loss="auto", freeze="", blockwise=100),
    # every norm is replaced: the per-block feature terms guide each block's new elementwise layers
    "dyt": Recipe(steps=1200, lr=2e-4, loss="cosine", freeze="", blockwise=0, features=1.0, new_lr_scale=10.0),
    "other": Recipe(steps=200, lr=1e-4, loss="auto", freeze="", blockwise=0),
}


#: heal's options a recipe fills in when they are left unset (None)
FILLED = ("steps", "lr", "loss", "freeze", "blockwise", "features", "new_lr_scale")


def change_kind(program: Program) -> str:
    """The kind of change earlier passes made to ``program`` (a key of :data:`RECIPES`)."""
    made = {edit.kind for edit in program.edits if edit.kind}
    return next((kind for kind in SEVERITY if kind in made), "other")
