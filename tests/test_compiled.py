"""graphopt.compiled: compiled forward and greedy decoding give what the eager model gives, and each compiled
model keeps its own graphs."""

import pytest
import torch

from graphopt.compiled import compiled_decoder, compiled_forward
from graphopt.helpers.zoo import hf_model


def test_compiled_decoding_gives_the_tokens_of_greedy_generate_and_forward_its_logits():
    model, inputs = hf_model("llama_causal_lm")
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=5, min_new_tokens=5)[:, ids.shape[1]:]
        decode = compiled_decoder(model, ids, 5)
        assert torch.equal(decode(), want)
        assert torch.equal(decode(), want)  # the static cache is reset for each decoding
        forward = compiled_forward(model)
        got = forward(input_ids=ids, use_cache=False).logits
        assert torch.allclose(got, model(input_ids=ids, use_cache=False).logits, atol=1e-5)


def test_each_compiled_function_has_code_of_its_own():
    """Dynamo keeps graphs per code object: two models compiled through the same function would share one
    cache (and its recompile limit)."""
    lin_a, lin_b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    a, b = compiled_forward(lin_a), compiled_forward(lin_b)
    assert a._torchdynamo_orig_callable.__code__ is not b._torchdynamo_orig_callable.__code__
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(a(x), lin_a(x)) and torch.allclose(b(x), lin_b(x))


@pytest.mark.parametrize("ids, tokens, says", [(torch.ones(5, dtype=torch.long), 3, "input_ids \\[batch, length\\]"),
                                               (torch.ones(1, 5, dtype=torch.long), 0, "new_tokens >= 1")])
def test_compiled_decoding_refuses_what_it_cannot_decode(ids, tokens, says):
    model, _ = hf_model("llama_causal_lm")
    with pytest.raises(ValueError, match=says):
        compiled_decoder(model, ids, tokens)
    with pytest.raises(TypeError, match="Linear is not one"):
        compiled_decoder(torch.nn.Linear(2, 2), torch.ones(1, 2, dtype=torch.long), 2)
