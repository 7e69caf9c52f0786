"""Embedding quality measures used by the benchmarks."""

import torch

from graphopt.helpers.quality import embedding_agreement, sentence_embeddings
from graphopt.helpers.zoo import hf_model


def test_sentence_embeddings_mask_padding_and_agreement():
    model, inputs = hf_model("bert")
    emb = sentence_embeddings(model, [inputs])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][:, 8:] = 0
    assert not torch.allclose(sentence_embeddings(model, [padded]), emb)  # padding is excluded
    ref = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    same_cos, same_nn = embedding_agreement(ref, ref)
    assert abs(same_cos - 1) < 1e-6 and same_nn == 1.0
    noisy = torch.nn.functional.normalize(ref + 0.5 * torch.randn(16, 8), dim=-1)
    cos, nn_same = embedding_agreement(ref, noisy)
    assert cos < 0.99 and 0.0 <= nn_same <= 1.0
    assert embedding_agreement(ref, -ref)[0] < -0.99
