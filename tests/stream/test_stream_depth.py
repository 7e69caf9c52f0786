"""Depth rewrites streamed from disk (``drop_blocks``, ``replace_blocks``: ``Pass.streams_by_forwards``): the same
model as in memory, with one block's weights held at a time."""

from __future__ import annotations

import pytest
import torch

import graphopt as go
import graphopt.stream.on_demand as on_demand
from graphopt.analysis.blocks import first_block_inputs
from graphopt.frontend.inputs import as_example_inputs
from graphopt.helpers.zoo import hf_model
from graphopt.nn.depth import LinearBlock
from graphopt.stream import StreamError, optimize_streamed


def _calib(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Six batches of four sequences of 16 tokens, the last sequence of each padded by 5."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(6):
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[3, -5:] = 0
        out.append({"input_ids": torch.randint(0, vocab, (4, 16), generator=g), "attention_mask": mask})
    return out


def _setup(name: str, folder) -> tuple[torch.nn.Module, list, dict]:
    model, _ = hf_model(name, layers=4)
    model.save_pretrained(folder)
    calib = _calib(model.config.vocab_size)
    if name == "llama_causal_lm":  # (and one without a padding mask)
        calib = [{"input_ids": b["input_ids"]} for b in calib]
    return model, calib, calib[0]


def _meta_base(model: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        return type(model)(model.config)


def _assert_same(in_memory: torch.nn.Module, loaded: torch.nn.Module, held_out: dict) -> None:
    a, b = in_memory.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {n: type(m) for n, m in in_memory.named_modules()} == {n: type(m) for n, m in loaded.named_modules()}
    x = as_example_inputs(held_out)
    assert torch.equal(x.call(in_memory)[0], x.call(loaded)[0])


@pytest.fixture
def small_chunks(monkeypatch):
    """Every linear layer outside the blocks over 4 KiB runs a slice of rows at a time (the LM head, as on an LLM)."""
    monkeypatch.setattr(on_demand, "CHUNK", 4096)


@pytest.mark.parametrize("name", ["llama_causal_lm", "gpt2_lm_head", "bert", "qwen2"])
@pytest.mark.parametrize("text", ["replace_blocks(n=2,calib_batches=5)", "replace_blocks(n=1,start=2,calib_batches=5)",
                                  "drop_blocks(n=1,calib_batches=5)"])
def test_depth_streamed_equals_in_memory(tmp_path, name, text, small_chunks):
    model, calib, example = _setup(name, tmp_path / "src")
    res = optimize_streamed(tmp_path / "src", example, text, calib=calib, out=tmp_path / "out")
    in_memory = go.optimize(model, example, text, calib=calib, measure=False, on_error="raise")
    n = 1 if "n=1" in text else 2
    assert res.blocks == 4 - n + ("replace" in text and not in_memory.report.records[-1].stats["folded"])
    (stats,) = res.stats.values()
    assert stats == in_memory.report.records[-1].stats  # the span, its distance, the rows fitted, folded or not
    loaded = go.load(tmp_path / "out", _meta_base(model))
    assert loaded.config.num_hidden_layers if name != "gpt2_lm_head" else loaded.config.n_layer == 4 - n
    _assert_same(in_memory.model, loaded, calib[-1])


def test_fold_and_linear_block_forms_both_stream(tmp_path):
    """Pre-norm Llama folds the map into the previous block's down-projection; post-norm BERT keeps a LinearBlock."""
    for name, folded in (("llama_causal_lm", 1), ("bert", 0)):
        _, calib, example = _setup(name, tmp_path / name)
        res = optimize_streamed(tmp_path / name, example, "replace_blocks(n=1,start=2,calib_batches=5)", calib=calib,
                                out=tmp_path / f"{name}-out")
        (stats,) = res.stats.values()
        assert stats["folded"] == folded


def test_depth_then_gptq_streamed_equals_in_memory(tmp_path):
    model, calib, example = _setup("qwen2", tmp_path / "src")
    text = "replace_blocks(n=1,start=2,calib_batches=5),quantize(scheme=int4,method=gptq)"  # (6 batches: each its own)
    res = optimize_streamed(tmp_path / "src", example, text, calib=calib, out=tmp_path / "out")
    in_memory = go.optimize(model, example, text, calib=calib, measure=False, on_error="raise")
    assert res.blocks == 3 and len(res.stats) == 2
    _assert_same(in_memory.model, go.load(tmp_path / "out", _meta_base(model)), calib[-1])


def test_one_block_loaded_at_a_time_while_the_span_is_chosen(tmp_path, monkeypatch, small_chunks):
    _, calib, example = _setup("llama_causal_lm", tmp_path / "src")
    seen: list[tuple[str, list[str]]] = []
    enter = on_demand.WeightsOnDemand._enter_block

    def checked(self, block):
        enter(self, block)
        real = sorted({self.source[id(b)] for b in self.model.model.layers for p in b.parameters() if not p.is_meta})
        seen.append((self.source[id(block)], real))

    monkeypatch.setattr(on_demand.WeightsOnDemand, "_enter_block", checked)
    optimize_streamed(tmp_path / "src", example, "replace_blocks(n=1,calib_batches=5)", calib=calib,
                      out=tmp_path / "out")
    assert len(seen) > 4 * 5  # every block on every calibration batch, and the structure probes
    assert all(real == [name] for name, real in seen)


def test_depth_after_a_block_local_pass_is_refused(tmp_path):
    _, calib, example = _setup("llama_causal_lm", tmp_path / "src")
    with pytest.raises(StreamError, match="must come before quantize"):  # (1 byte: the model does not fit either)
        optimize_streamed(tmp_path / "src", example, "quantize(scheme=int8),drop_blocks(n=1)", calib=calib,
                          out=tmp_path / "out", memory_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_linear_block_form_is_not_on_meta(tmp_path):
    """The LinearBlock a streamed replace builds holds real weights (built beside a loaded block, not on meta)."""
    model, calib, example = _setup("bert", tmp_path / "src")
    optimize_streamed(tmp_path / "src", example, "replace_blocks(n=1,start=1,calib_batches=5)", calib=calib,
                      out=tmp_path / "out")
    loaded = go.load(tmp_path / "out", _meta_base(model))
    (block,) = [m for m in loaded.modules() if isinstance(m, LinearBlock)]
    assert torch.isfinite(block.linear.weight).all() and block.linear.weight.abs().sum() > 0


def test_model_on_demand_computes_what_the_loaded_model_does(tmp_path, small_chunks):
    """A whole forward on weights read block by block (the tied LM head a slice of rows at a time) gives the
    loaded model's logits, and leaves every weight on meta."""
    from graphopt.stream import Checkpoint, meta_skeleton

    model, _ = hf_model("llama_causal_lm", layers=3)
    model.config.tie_word_embeddings = True
    model = type(model)(model.config).eval()
    model.save_pretrained(tmp_path / "src")
    skeleton = meta_skeleton(Checkpoint(tmp_path / "src").config())
    batch = _calib(model.config.vocab_size)[0]
    with on_demand.WeightsOnDemand(skeleton, Checkpoint(tmp_path / "src"), [f"model.layers.{i}" for i in range(3)]):
        assert "forward" in vars(skeleton.lm_head)  # chunked: its table is larger than CHUNK
        layers = skeleton.model.layers
        first_block_inputs(skeleton, layers[2], [batch])  # stops inside block 2's pre-hooks: it stays loaded
        assert not layers[2].mlp.down_proj.weight.is_meta
        real: list[list[int]] = []
        layers[0].register_forward_pre_hook(
            lambda m, a: real.append([i for i, b in enumerate(layers) if not b.mlp.down_proj.weight.is_meta]))
        with torch.no_grad():
            got = skeleton(**batch).logits
        assert real == [[0]]  # block 2 was freed when block 0 loaded
    with torch.no_grad():
        want = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for p in skeleton.parameters()) and "forward" not in vars(skeleton.lm_head)
