"""heal(blockwise=N): block-by-block reconstruction lowers every block's error, is seeded, and composes."""

import pytest
import torch

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.infra.manager import PassFailedError

from .heal_data import token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(model, n=6, seed=0):
    return token_batches(model, n, seed)


def _blockwise(name, lossy):
    model, inputs = hf_model(name, layers=3)
    res = go.optimize(model, inputs, f"{lossy},heal(blockwise=40,steps=0)", calib=_calib(model), measure=False,
                      on_error="raise")
    rec = res.report.records[-1]
    pairs = rec.stats["block_losses"]
    assert len(pairs) == 3 == sum("block-wise reconstruction loss" in d.message for d in rec.diagnostics)
    assert all(after <= before for before, after in pairs) and any(after < 0.9 * before for before, after in pairs)
    assert rec.stats["block_loss_after"] < rec.stats["block_loss_before"]
    return rec


@pytest.mark.parametrize("name", ["bert", "llama", "t5_encoder"])
def test_blockwise_heal_lowers_each_blocks_reconstruction_error(name):
    rec = _blockwise(name, "prune(ratio=0.5)")
    assert rec.stats["loss_after"] < rec.stats["loss_before"]  # the held-out output loss moved too


def test_blockwise_heal_after_a_block_replacement():
    rec = _blockwise("bert", "replace_blocks(n=1,start=1)")
    # on random blocks the replacement is already near exact at the output: nothing there to gain
    assert rec.stats["loss_after"] <= rec.stats["loss_before"] < 1e-5


def test_blockwise_heal_is_deterministic_under_a_seed_and_composes_with_end_to_end():
    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    runs = [go.optimize(model, inputs, "prune(ratio=0.5),heal(blockwise=20,steps=10,seed=3)", calib=calib,
                        measure=False, on_error="raise").model for _ in range(2)]
    for (n, a), (_, b) in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        assert torch.equal(a, b), n
    rec = go.optimize(model, inputs, "prune(ratio=0.5),heal(blockwise=20,steps=10,seed=3)", calib=calib,
                      measure=False, on_error="raise").report.records[-1]
    assert rec.stats["steps"] == 10 and rec.stats["block_loss_after"] < rec.stats["block_loss_before"]


def test_blockwise_heal_leaves_no_gradient_behind_a_block():
    from graphopt.passes.heal.blockwise import heal_blocks
    from graphopt.passes.heal.losses import nmse

    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    student = go.optimize(model, inputs, "prune(ratio=0.5)", calib=calib, measure=False, on_error="raise").model
    names = go.Program(student, inputs, original=model).analyses.get("matching_blocks")[0]
    report = heal_blocks(model, student, names, calib, {id(p) for p in student.parameters()}, nmse, steps=5,
                         lr=1e-3, seed=0, clip=1.0)
    assert len(report) == 3 and any(after < before for before, after in report)
    assert all(p.grad is None for p in student.parameters())  # a block's gradients go once it is fitted


def test_blockwise_heal_refuses_blocks_that_no_longer_match():
    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    with pytest.raises(PassFailedError, match="one to one"):
        go.optimize(model, inputs, "drop_blocks(n=1),heal(blockwise=5,steps=0)", calib=calib, measure=False,
                    on_error="raise")


# --- LoRA ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_lora_merge_gives_the_outputs_of_the_adapted_model_and_leaves_no_trace(name):
    from graphopt.passes.heal.lora import LoRA

    model, inputs = hf_model(name)
    keys = list(model.state_dict())
    adapters = LoRA(model, rank=4, targets="*", seed=1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.05)
        adapted = model(**inputs).last_hidden_state
    adapters.merge()
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4)
    assert list(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())


def test_heal_with_lora_trains_adapters_only_and_merges_them():
    model, inputs = hf_model("bert", layers=3)
    calib = _calib(model)
    res = go.optimize(model, inputs, "prune(ratio=0.5),heal(steps=30,lr=1e-2,lora=4,lora_targets=*attention*)",
                      calib=calib, measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert rec.stats["lora_layers"] == 3 * 4 and rec.stats["loss_after"] < rec.stats["loss_before"]
    adapted = [m for n, m in res.model.named_modules() if "attention" in n and isinstance(m, torch.nn.Linear)]
    assert rec.stats["trained_params"] == sum(4 * (m.in_features + m.out_features) for m in adapted)
    assert not any(m._forward_hooks for m in res.model.modules())
    pruned = go.optimize(model, inputs, "prune(ratio=0.5)", measure=False).model
    assert list(res.model.state_dict()) == list(pruned.state_dict())
    changed = [n for n, p in res.model.named_parameters() if not torch.equal(p, pruned.state_dict()[n])]
    assert changed and all("attention" in n and n.endswith("weight") for n in changed)
    with pytest.raises(PassFailedError, match="matches no Linear"):
        go.optimize(model, inputs, "heal(steps=2,lora=4,lora_targets=nothing*)", calib=calib, measure=False,
                    on_error="raise")
    with pytest.raises(PassFailedError, match="linear layers are quantized.*heal before quantize"):
        go.optimize(model, inputs, "quantize(scheme=int4,group_size=32),heal(steps=2,lora=4)", calib=calib,
                    measure=False, on_error="raise")


def test_a_lora_rank_as_wide_as_a_layer_is_refused():
    model, inputs = hf_model("bert", layers=2)
    with pytest.raises(PassFailedError, match=r"heal\(lora=64\): encoder.layer.0.attention.self.query is 16 x 32.*give lora < 16"):
        go.optimize(model, inputs, "prune(ratio=0.5),heal(steps=2,lora=64)", calib=_calib(model), measure=False,
                    on_error="raise")
    assert not any(m._forward_hooks for m in model.modules())
