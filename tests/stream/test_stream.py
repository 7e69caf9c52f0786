"""Streaming from disk (graphopt.stream): the same model as in memory, one block's weights at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graphopt as go
from graphopt.frontend.inputs import as_example_inputs
from graphopt.helpers.zoo import hf_model
from graphopt.passes.quantize.quantize import Quantize
from graphopt.stream import Checkpoint, StreamError, meta_skeleton, optimize_streamed
from graphopt.stream.parts import Parts

GPTQ = "quantize(scheme=int4,method=gptq,calib_batches=3)"


def _calib(vocab: int, *, padded: bool) -> list[dict[str, torch.Tensor]]:
    """Four batches of two sequences; ``padded``: the second sequence of each ends in 5 padding tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        mask = torch.ones(2, 12, dtype=torch.long)
        if padded:
            mask[1, -5:] = 0
        out.append({"input_ids": torch.randint(0, vocab, (2, 12), generator=g), "attention_mask": mask})
    return out


def _saved(name: str, folder: Path, **save: object) -> tuple[torch.nn.Module, dict]:
    model, example = hf_model(name, layers=3)
    model.save_pretrained(folder, **save)
    return model, example


def _meta_base(model: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        return type(model)(model.config)


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert {n: type(m) for n, m in a.named_modules()} == {n: type(m) for n, m in b.named_modules()}


@pytest.mark.parametrize("name", ["llama_causal_lm", "gpt2", "bert", "qwen2"])
@pytest.mark.parametrize("text", [GPTQ, "quantize(scheme=int8)"])
def test_streamed_equals_in_memory(tmp_path, name, text):
    model, example = _saved(name, tmp_path / "src")
    calib = _calib(model.config.vocab_size, padded=True)
    example = calib[0] if "input_ids" in example else example
    if name == "llama_causal_lm":
        calib = [{"input_ids": b["input_ids"]} for b in calib]
        example = calib[0]
    res = optimize_streamed(tmp_path / "src", example, text, calib=calib, out=tmp_path / "out")
    warned = [d.message for d in res.diagnostics if d.level == "warning"]
    if name == "bert" and "gptq" in text:  # its pooler lies outside the blocks: GPTQ would run the whole model
        assert len(warned) == 1 and warned[0].startswith(f"{text}: pooler.dense stay in float")
        text = text.replace(")", ",skip=[pooler.*])")
    else:  # BERT's pooler rounded to nearest once the blocks are done; the others hold no layer outside them
        assert warned == []
    in_memory = go.optimize(model, example, text, calib=calib, measure=False, on_error="raise")
    loaded = go.load(tmp_path / "out", _meta_base(model))
    assert res.blocks == 3
    (stats,) = res.stats.values()
    assert stats["layers"] == in_memory.report.records[-1].stats["layers"] > 0
    _assert_same_model(in_memory.model, loaded)
    held_out = as_example_inputs(calib[1])
    assert torch.equal(held_out.call(in_memory.model)[0], held_out.call(loaded)[0])


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    """While a block's passes run, every parameter outside it is on meta (holds no memory)."""
    model, _ = _saved("llama_causal_lm", tmp_path / "src")
    calib = [{"input_ids": b["input_ids"]} for b in _calib(model.config.vocab_size, padded=False)]
    real_outside: list[list[str]] = []
    run = Quantize.run

    def checked(self, program, am):
        block = program.stream.name
        real_outside.append([n for n, p in program.module.named_parameters()
                             if not p.is_meta and not n.startswith(f"{block}.")])
        return run(self, program, am)

    monkeypatch.setattr(Quantize, "run", checked)
    optimize_streamed(tmp_path / "src", calib[0], GPTQ, calib=calib, out=tmp_path / "out")
    assert real_outside == [[], [], []]


def test_sharded_checkpoint_is_read(tmp_path):
    model, example = _saved("llama", tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    res = optimize_streamed(tmp_path / "src", example, "quantize(scheme=int8)", out=tmp_path / "out")
    loaded = go.load(tmp_path / "out", _meta_base(model))
    _assert_same_model(go.optimize(model, example, "quantize(scheme=int8)", measure=False).model, loaded)
    assert res.stats["quantize(scheme=int8,method=rtn)"]["layers"] == 3 * 7  # q, k, v, o, gate, up, down


@pytest.mark.parametrize("text, why", [
    ("prune(ratio=0.2)", "prune works on the whole model"),
    ("quantize(scheme=int4,budget_bits=6)", "budget_bits ranks every layer"),
    ("quantize(scheme=int8,lm_head=true)", "the LM head and embedding tables lie outside the blocks"),
    ("quantize(scheme=w8a8)", "SmoothQuant folds its scales"),
    ("quantize(scheme=int4,method=gptq)", "quantize needs calibration data"),
])
def test_whole_model_passes_refused_before_any_work(tmp_path, text, why):
    """...when the model does not fit the memory limit either (the tiny model fits 100 KB: 1 byte is set)."""
    model, _ = _saved("llama_causal_lm", tmp_path / "src")
    calib = None if "calibration" in why else [{"input_ids": b["input_ids"]}
                                                for b in _calib(model.config.vocab_size, padded=False)]
    with pytest.raises(StreamError, match=why) as refused:
        optimize_streamed(tmp_path / "src", {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, text,
                          out=tmp_path / "out", memory_limit=1, calib=calib)
    if calib is not None:
        assert "nor run it on the whole model in memory: about 0.0 GiB needed" in str(refused.value)
        assert "is over the memory_limit of 0.0 GiB" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_whole_model_pass_runs_in_memory_when_the_model_fits(tmp_path):
    model, example = _saved("llama_causal_lm", tmp_path / "src")
    calib = [{"input_ids": b["input_ids"]} for b in _calib(model.config.vocab_size, padded=False)]
    text = "prune(ratio=0.25,importance=taylor,calib_batches=3)"
    res = optimize_streamed(tmp_path / "src", example, text, calib=calib, out=tmp_path / "out")
    assert res.blocks == 0 and "optimize ran on it whole" in res.diagnostics[-1].message
    assert "fits within the available memory" in res.diagnostics[-1].message
    in_memory = go.optimize(model, example, text, calib=calib, measure=False, on_error="raise")
    _assert_same_model(in_memory.model, go.load(tmp_path / "out", _meta_base(model)))
    assert res.stats[in_memory.report.records[-1].text] == in_memory.report.records[-1].stats


def test_memory_needed_counts_the_copies_a_pipeline_holds():
    from graphopt.infra.pipeline import as_pipeline
    from graphopt.stream.whole import memory_needed

    assert memory_needed(list(as_pipeline("prune(ratio=0.2)")), 10)[0] == 20  # the model and the snapshot
    assert memory_needed(list(as_pipeline("prune(ratio=0.2),heal")), 10)[0] == 60  # + teacher, grads, 2 moments


def test_failed_run_leaves_the_output_as_it_was(tmp_path, monkeypatch):
    model, example = _saved("llama", tmp_path / "src")
    go.save(go.optimize(model, example, "quantize(scheme=int8)", measure=False), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    run, blocks = Quantize.run, []

    def fails_on_the_third_block(self, program, am):
        blocks.append(program.stream.name)
        if len(blocks) == 3:
            raise RuntimeError("disk full")
        return run(self, program, am)

    monkeypatch.setattr(Quantize, "run", fails_on_the_third_block)
    with pytest.raises(RuntimeError, match="disk full"):
        optimize_streamed(tmp_path / "src", example, "quantize(scheme=int4)", out=tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the parts are gone


def test_skeleton_holds_no_weights_and_real_rotary_tables(tmp_path):
    model, _ = hf_model("llama_causal_lm")
    model.config.tie_word_embeddings = True
    type(model)(model.config).save_pretrained(tmp_path / "src")
    skeleton = meta_skeleton(Checkpoint(tmp_path / "src").config())
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert not skeleton.model.rotary_emb.inv_freq.is_meta


def test_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(StreamError, match="is not a folder"):
        Checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamError, match="save_pretrained"):
        Checkpoint(tmp_path / "empty")
    model, example = _saved("llama", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["intermediate_size"] *= 2  # the files no longer fit the config
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StreamError, match="in the model built from its config"):
        optimize_streamed(tmp_path / "src", example, "quantize(scheme=int8)", out=tmp_path / "out")


def test_parts_join_into_one_file(tmp_path):
    from safetensors.torch import load_file

    parts = Parts(tmp_path / "parts")
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.tensor([1, 2], dtype=torch.int8)}
    b = {"z": torch.ones(5, dtype=torch.bfloat16)}
    parts.write(a)
    parts.write(b)
    with pytest.raises(ValueError, match="written twice"):
        parts.write({"x": torch.zeros(1)})
    parts.join(tmp_path / "all.safetensors", {"k": "v"})
    got = load_file(str(tmp_path / "all.safetensors"))
    assert got.keys() == {"x", "y", "z"} and all(torch.equal(got[k], {**a, **b}[k]) for k in got)
    parts.discard()
    assert not (tmp_path / "parts").exists()
