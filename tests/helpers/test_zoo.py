"""The zoo: tiny HF models from configs, deterministic, with the shapes their names promise."""

from __future__ import annotations

import pytest
import torch

from graphopt.helpers.zoo import ZOO, hf_model, llama_meta


def test_unknown_name_lists_the_choices():
    with pytest.raises(KeyError, match="bert.*mobilenet_v2"):
        hf_model("bart")


def test_same_seed_same_weights_other_seed_differs():
    a, _ = hf_model("qwen2", seed=3)
    b, _ = hf_model("qwen2", seed=3)
    c, _ = hf_model("qwen2", seed=4)
    wa, wb, wc = (m.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("name,kv_heads", [("llama", 2), ("qwen2", 2), ("mistral", 1)])
def test_gqa_models_have_fewer_kv_heads(name, kv_heads):
    model, _ = hf_model(name)
    cfg = model.config
    attn = model.layers[0].self_attn
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads == kv_heads < cfg.num_attention_heads
    assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * head_dim
    assert attn.q_proj.out_features == cfg.num_attention_heads * head_dim


def test_zoo_models_are_tiny_in_eval_mode_with_matching_inputs():
    for name in ZOO:
        model, inputs = hf_model(name)
        assert not model.training, name
        assert sum(p.numel() for p in model.parameters()) < 250_000, name
        assert all(isinstance(v, torch.Tensor) for v in inputs.values()), name


def test_llama_meta_has_llama2_7b_shapes_and_no_storage():
    model, inputs = llama_meta("7b", num_layers=1)
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    assert sum(p.numel() for p in model.parameters()) == vocab * hidden + per_layer + hidden
    assert per_layer * 32 + vocab * hidden + hidden == 6_607_343_616  # the 32-layer model (no LM head)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert inputs["input_ids"].device.type == "meta"


def test_llama_meta_405b_has_llama3_405b_shapes_with_grouped_kv_heads():
    model, _ = llama_meta("405b", num_layers=1)
    hidden, inter, vocab, kv = 16384, 53248, 128256, 8 * 128
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    assert sum(p.numel() for p in model.parameters()) == vocab * hidden + per_layer + hidden
    assert per_layer * 126 + vocab * hidden + hidden == 403_752_042_496  # the 126-layer model (405.8B with its LM head)
    assert model.layers[0].self_attn.k_proj.weight.shape == (kv, hidden)
    with pytest.raises(KeyError, match="choose from 7b, 405b"):
        llama_meta("70x")
