"""Output-quality measures for optimised embedding models (used by benchmarks and examples)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..infra.quality import masked_mean


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: attention-masked mean pooling, L2 norm."""
    out = []
    for batch in batches:
        pooled = masked_mean(model(**batch).last_hidden_state, batch["attention_mask"])
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of paired (normalised) embeddings, and the share of rows whose nearest other row is the same."""
    cos = float((ref * got).sum(-1).mean())
    eye = torch.eye(ref.shape[0], dtype=torch.bool)
    nn_ref = (ref @ ref.T).masked_fill(eye, -2).argmax(1)
    nn_got = (got @ got.T).masked_fill(eye, -2).argmax(1)
    return cos, float((nn_ref == nn_got).float().mean())
