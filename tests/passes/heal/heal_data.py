"""Random token batches with some padding, for the heal tests."""

import torch


def token_batches(model, n=6, seed=0):
    """``n`` batches of 4 x 12 random tokens of ``model``'s vocabulary; the first row's last 4 are padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 8:] = 0
        out.append({"input_ids": torch.randint(0, model.config.vocab_size, (4, 12), generator=g),
                    "attention_mask": mask})
    return out
