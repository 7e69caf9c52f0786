"""The one block finder (analysis/blocks.py): every pass that works block by block sees the same blocks."""

import copy

import pytest
import torch

import graphopt as go
from graphopt.analysis.blocks import all_blocks, block_of, find_blocks
from graphopt.helpers.zoo import hf_model
from graphopt.passes.dyt import find_norms, norms_by_block

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_encoder_decoder_has_two_stacks_and_the_main_one_is_shared_by_every_consumer():
    model, inputs = hf_model("t5")
    stacks = all_blocks(model, inputs)
    assert [s.path for s in stacks] == ["decoder.block", "encoder.block"]
    assert find_blocks(model, inputs).names == ["decoder.block.0", "decoder.block.1"]
    # heal's per-block feature terms pair whole blocks (once: the three sublayers of decoder.block.0)
    program = go.Program(copy.deepcopy(model), inputs, original=model)
    assert program.analyses.get("matching_blocks") == (find_blocks(model, inputs).names, "")
    assert block_of("encoder.block.1.layer.0.SelfAttention.q", stacks) == "encoder.block.1"
    assert block_of("shared", stacks) is None


def test_dyt_groups_norms_by_the_blocks_of_either_stack():
    model, inputs = hf_model("t5")
    program = go.analyze(model, inputs)
    groups = norms_by_block(find_norms(program), program.analyses.get("blocks"))
    assert groups["encoder.block.0"] == {"encoder.block.0.layer.0.layer_norm", "encoder.block.0.layer.1.layer_norm"}
    assert len(groups["decoder.block.1"]) == 3  # self-attention, cross-attention, feed-forward
    assert {"encoder.final_layer_norm", "decoder.final_layer_norm"} <= set(groups)


def test_the_blocks_analysis_is_cached_and_follows_a_depth_rewrite():
    model, inputs = hf_model("llama", layers=3)
    res = go.optimize(model, inputs, "drop_blocks(n=1,start=1)", measure=False, on_error="raise")
    program = res.program
    first = program.analyses.get("blocks")
    assert first is program.analyses.get("blocks") and len(first[0]) == 2
    with torch.no_grad():
        assert find_blocks(res.model, inputs).names == first[0].names
