"""factorize: low-rank pairs on HF models it was not written for; errors before any change; the factors are
ordinary layers for quantize, heal, save / load and ONNX."""

import re

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.emit.hf import NotLoadableError
from graphopt.helpers.zoo import hf_model
from graphopt.nn.lowrank import LowRankLinear
from graphopt.nn.quant import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(model, inputs, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {k: v.clone() for k, v in inputs.items()}
        batch["input_ids"] = torch.randint(0, model.config.vocab_size, batch["input_ids"].shape, generator=g)
        out.append(batch)
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _notes(res, name="factorize"):
    rec = next(r for r in res.report.records if r.name.startswith(name))
    return {d.target: d for d in rec.diagnostics}, rec


@pytest.mark.parametrize("name", ["llama_causal_lm", "gpt2_lm_head", "qwen2_causal_lm"])
def test_causal_lms_are_factorized_and_generate(name):
    model, inputs = hf_model(name)
    calib = _calib(model, inputs)
    res = go.optimize(model, inputs, "factorize(ratio=0.3)", calib=calib, on_error="raise")
    pairs = {n: m for n, m in res.model.named_modules() if isinstance(m, LowRankLinear)}
    dense = sum(m.in_features * m.out_features for m in pairs.values())
    kept = sum(m.rank * (m.in_features + m.out_features) for m in pairs.values())
    assert len(pairs) >= 8 and kept <= 0.7 * dense  # the ratio, on every Linear / Conv1D but the head
    assert type(res.model.get_output_embeddings()) is nn.Linear  # the head stays dense by default
    notes, rec = _notes(res)
    assert rec.stats["removed"] >= 0.3 and "left dense" not in str(notes)
    some = next(iter(pairs))
    assert notes[some].message.startswith(f"rank {pairs[some].rank} of ") and "truncation loss" in notes[some].message
    assert res.report.records[-1].cosine > 0.5 and torch.isfinite(torch.tensor(res.report.records[-1].cosine))
    ids = inputs["input_ids"][:1, :4]
    with torch.no_grad():
        out = res.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # the caller's model is untouched


def test_gpt2_conv1d_layers_become_pairs_that_compute_their_transposed_weight():
    model, inputs = hf_model("gpt2_lm_head")
    conv = model.transformer.h[0].attn.c_attn
    res = go.optimize(model, inputs, "factorize(rank=8,method=svd,where=*.c_attn)", on_error="raise")
    pair = res.model.transformer.h[0].attn.c_attn
    assert isinstance(pair, LowRankLinear) and (pair.in_features, pair.out_features) == tuple(conv.weight.shape)
    x = torch.randn(3, conv.weight.shape[0])
    with torch.no_grad():
        full = go.optimize(model, inputs, f"factorize(rank={min(conv.weight.shape) // 2 - 1},method=svd,"
                                          "where=*.c_attn)", measure=False).model.transformer.h[0].attn.c_attn
        # the rank-8 pair is the truncated SVD of Conv1D's [in, out] weight, transposed
        u, s, vh = torch.linalg.svd(conv.weight.T.double())
        best = (u[:, :8] * s[:8]) @ vh[:8]
        assert torch.allclose(pair.dense_weight().double(), best, atol=1e-5)
        assert full(x).shape == conv(x).shape


def test_whitening_beats_plain_svd_on_bert_and_skips_a_layer_calibration_barely_reaches():
    model, inputs = hf_model("bert")
    calib = _calib(model, inputs)  # 12 sequences: the pooler sees 12 rows for its 32 input features
    whiten = go.optimize(model, inputs, "factorize(ratio=0.3)", calib=calib, on_error="raise")
    plain = go.optimize(model, inputs, "factorize(ratio=0.3,method=svd,skip=[pooler.*])", calib=calib,
                        on_error="raise")
    assert 1 - whiten.report.records[-1].cosine < 0.5 * (1 - plain.report.records[-1].cosine)
    assert "12 rows for 32 input features" in _notes(whiten)[0]["pooler.dense"].message
    assert type(whiten.model.pooler.dense) is nn.Linear
    assert isinstance(whiten.model.encoder.layer[0].attention.self.query, LowRankLinear)


def test_directions_allocation_leaves_the_square_projections_dense_at_a_small_ratio_and_says_why():
    model, inputs = hf_model("bert")  # hidden 32, intermediate 64: up and down are 32 x 64
    res = go.optimize(model, inputs, "factorize(ratio=0.1,allocation=directions,rank_multiple=2,skip=[pooler.*])",
                      calib=_calib(model, inputs, n=12), on_error="raise")
    layer = res.model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, LowRankLinear) and isinstance(layer.output.dense, LowRankLinear)
    assert type(layer.attention.self.query) is nn.Linear
    notes, rec = _notes(res)
    assert "share of directions every layer keeps" in notes["encoder.layer.0.attention.self.query"].message
    assert rec.stats["removed"] >= 0.1


@pytest.mark.parametrize("pipeline,calib_given,message", [
    ("factorize(rank=40)", True, "saves nothing on .* break-even rank"),
    ("factorize", False, "needs calibration data"),
    ("factorize(ratio=0.2,rank=4)", True, "not both"),
    ("factorize(rank=4,allocation=global)", True, "drop allocation or rank"),
    ("factorize(ratio=0.99,allocation=global,rank_multiple=16)", True, "lower the ratio or rank_multiple"),
    ("factorize(rank=4,allocation=directions)", True, "drop allocation or rank"),
    ("factorize(ratio=0.99,allocation=directions,rank_multiple=16)", True, "lower the ratio or rank_multiple"),
])
def test_bad_requests_fail_before_any_change(pipeline, calib_given, message):
    model, inputs = hf_model("llama_causal_lm")
    before = _state(model)
    with pytest.raises(Exception, match=message):
        go.optimize(model, inputs, pipeline, calib=_calib(model, inputs) if calib_given else None, on_error="raise")
    assert _unchanged(model, before)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_a_ratio_out_of_range_is_refused(ratio):
    model, inputs = hf_model("llama_causal_lm")
    with pytest.raises(go.PipelineError, match=r"ratio.*\(0, 1\)"):
        go.optimize(model, inputs, f"factorize(ratio={ratio},method=svd)", on_error="raise")


def test_layers_factorized_already_are_refused_with_the_way_out():
    model, inputs = hf_model("llama_causal_lm")
    once = go.optimize(model, inputs, "factorize(rank=4,method=svd)", on_error="raise").model
    before = _state(once)
    with pytest.raises(go.PassFailedError, match=r"factorized already .*skip=\['model.layers.0"):
        go.optimize(once, inputs, "factorize(rank=2,method=svd)", on_error="raise")
    assert _unchanged(once, before)


def test_layers_it_cannot_rebuild_are_skipped_with_the_reason():
    class Scaled(nn.Linear):  # a subclass whose forward adds something
        def forward(self, x):
            return 2 * super().forward(x)

    model, inputs = hf_model("llama_causal_lm")
    attn = model.model.layers[0].self_attn
    old = attn.q_proj
    attn.q_proj = Scaled(old.in_features, old.out_features, bias=False)
    attn.q_proj.load_state_dict(old.state_dict())
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, o: o)
    res = go.optimize(model, inputs, "factorize(rank=4,method=svd)", on_error="raise")
    notes, _ = _notes(res)
    assert "overrides Linear.forward" in notes["model.layers.0.self_attn.q_proj"].message
    assert "forward hook" in notes["model.layers.0.mlp.up_proj"].message
    assert "LM head" in notes["lm_head"].message
    assert type(res.model.model.layers[0].self_attn.q_proj) is Scaled
    assert isinstance(res.model.model.layers[0].self_attn.k_proj, LowRankLinear)


def test_a_layer_the_calibration_data_never_reaches_stays_dense_and_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.used(x)

    x = torch.randn(64, 16)
    res = go.optimize(Branchy().eval(), x, "factorize(rank=4)", calib=[x, x + 1], on_error="raise")
    notes, _ = _notes(res)
    assert "never ran on the calibration data" in notes["unused"].message and "method=svd" in notes["unused"].message
    assert isinstance(res.model.used, LowRankLinear) and type(res.model.unused) is nn.Linear


def test_a_tied_head_stays_dense_and_an_untied_one_is_factorized_with_lm_head():
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "factorize(rank=4,method=svd,lm_head=true)", on_error="raise")
    assert isinstance(res.model.get_output_embeddings(), LowRankLinear)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    res = go.optimize(model, inputs, "factorize(rank=4,method=svd,lm_head=true)", on_error="raise")
    assert type(res.model.get_output_embeddings()) is nn.Linear
    assert "tied to the embedding table" in _notes(res)[0]["lm_head"].message


def test_quantize_packs_both_factors_with_gptq(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    calib = _calib(model, inputs)
    res = go.optimize(model, inputs, "factorize(ratio=0.2),quantize(scheme=int8,method=gptq)", calib=calib,
                      on_error="raise")
    pairs = [m for m in res.model.modules() if isinstance(m, LowRankLinear)]
    assert pairs and all(isinstance(p.down, QuantLinear) and isinstance(p.up, QuantLinear) for p in pairs)
    factorized, quantized = res.report.records[-2], res.report.records[-1]
    assert quantized.cosine > factorized.cosine - 0.01  # int8 GPTQ on the factors adds little to the truncation
    with pytest.raises(NotLoadableError, match="compressed-tensors format cannot hold"):  # no pairs in that format
        res.model.save_pretrained(tmp_path / "ct")
    assert not (tmp_path / "ct").exists() or not any((tmp_path / "ct").iterdir())


def test_heal_after_factorize_lowers_the_held_out_loss():
    model, inputs = hf_model("bert")
    calib, held_out = _calib(model, inputs, n=8), _calib(model, inputs, n=4, seed=7)
    cut = go.optimize(model, inputs, "factorize(rank=4)", calib=calib, measure=False, on_error="raise").model
    healed = go.optimize(model, inputs, "factorize(rank=4),heal", calib=calib, measure=False, on_error="raise")
    assert any(e.kind == "factorize" for e in healed.program.edits)
    assert "recipe for factorize" in str(healed.report.records[-1].diagnostics)

    def error(student):
        with torch.no_grad():
            return sum(float((student(**b).last_hidden_state - model(**b).last_hidden_state).pow(2).mean())
                       for b in held_out)

    assert error(healed.model) < 0.5 * error(cut)  # on batches heal never saw


def test_save_load_and_onnx_round_trips(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "factorize(ratio=0.3)", calib=_calib(model, inputs), measure=False,
                      on_error="raise")
    assert res.export_onnx(tmp_path / "m.onnx").verified  # in onnxruntime, against torch
    go.save(res, tmp_path / "f")
    loaded = go.load(tmp_path / "f", hf_model("llama_causal_lm")[0])
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, res.model(**inputs).logits)
    with pytest.raises(NotLoadableError, match="go.save"):
        res.model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()


def test_its_ratios_join_the_goal_search_and_the_answer_is_rebuilt_from_its_text():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(6, 64, generator=g)  # inputs in 6 of 64 directions: the first layer is rank 6 on them

    def data(n):
        return [torch.randn(64, 6, generator=g) @ mix for _ in range(n)]

    calib, held_out, x = data(8), data(4), data(1)[0][:4]
    res = go.optimize_for(model, x, "quality>=0.999,objective=size,passes=[factorize],refine=0", calib=calib,
                          eval_data=held_out, cache=False)
    cuts = [p for p in res.search.points if "factorize(" in p.pipeline]
    assert {p.pipeline.split("factorize(ratio=")[1][:3] for p in cuts} == {"0.1", "0.2", "0.3"}  # its own choices
    assert {"global", "uniform", "directions"} == {(re.findall(r"allocation=(\w+)", p.pipeline) or ["uniform"])[0]
                                                   for p in cuts}
    feasible = [p for p in cuts if p.quality >= 0.999]
    best = res.search.best
    assert best is not None and best.pipeline.endswith("allocation=global)")
    assert best.size == min(p.size for p in feasible) < 0.85  # the first layer's rank-6 inputs cost nothing to cut
    rebuilt = go.optimize(model, x, str(res.pipeline), calib=calib, measure=False).model
    with torch.no_grad():
        assert torch.equal(rebuilt(held_out[0]), res.model(held_out[0]))
