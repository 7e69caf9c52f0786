"""quantize(lm_head=true) on language models whose LM head is tied to the embedding table: packed once."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.emit.hf import NotLoadableError
from graphopt.helpers.zoo import hf_model
from graphopt.infra.metrics import count_weight_bytes
from graphopt.nn.quant import QuantEmbedding, QuantLinear


def _tied(name):
    model, inputs = hf_model(name)
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not table.weight:  # the tiny Llama's config unties them: tie them as SmolLM2's are
        model.config.tie_word_embeddings = True
        head.weight = table.weight
    return model, {"input_ids": inputs["input_ids"]}


@pytest.mark.parametrize("name", ["llama_causal_lm", "gpt2_lm_head"])
@pytest.mark.parametrize("scheme", ["int8", "int4,group_size=16"])
def test_a_tied_head_and_table_are_packed_once_and_stay_tied(name, scheme):
    model, inputs = _tied(name)
    plain = go.optimize(model, inputs, f"quantize(scheme={scheme})", measure=False, on_error="raise").model
    res = go.optimize(model, inputs, f"quantize(scheme={scheme},lm_head=true)", on_error="raise")
    head, table = res.model.get_output_embeddings(), res.model.get_input_embeddings()
    assert isinstance(head, QuantLinear) and isinstance(table, QuantEmbedding)
    assert table.qweight is head.qweight and table.scale is head.scale  # one copy of the codes
    vocab, hidden = head.out_features, head.in_features
    float_table = vocab * hidden * 4
    assert count_weight_bytes(plain) - count_weight_bytes(res.model) > 0.6 * float_table  # the float table is gone
    ids = inputs["input_ids"]
    with torch.no_grad():  # a lookup is a row of the head's dequantized weight
        assert torch.equal(table(ids), head.dequantized_weight()[ids])
    assert res.report.records[-1].cosine > (0.999 if scheme == "int8" else 0.98)
    assert any(e.op == "tie" and e.target.endswith("qweight") for e in res.program.edits)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # the caller's, untouched
    assert isinstance(model.get_output_embeddings(), nn.Linear)


def test_the_tie_survives_save_and_load_and_exports_to_onnx(tmp_path):
    model, inputs = _tied("llama_causal_lm")
    res = go.optimize(model, inputs, "quantize(scheme=int4,group_size=16,lm_head=true)", measure=False,
                      on_error="raise")
    assert res.export_onnx(tmp_path / "m.onnx", quant_format="matmulnbits").verified  # in onnxruntime, against torch
    go.save(res, tmp_path / "q")
    loaded = go.load(tmp_path / "q", _tied("llama_causal_lm")[0])
    assert loaded.get_input_embeddings().qweight is loaded.get_output_embeddings().qweight
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, res.model(**inputs).logits)
        out = loaded.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_tied_head_that_cannot_share_its_codes_stays_in_float_and_says_why():
    model, inputs = _tied("llama_causal_lm")
    res = go.optimize(model, inputs, "quantize(scheme=w8a8,alpha=0,lm_head=true)", measure=False,
                      on_error="raise")
    head, table = res.model.get_output_embeddings(), res.model.get_input_embeddings()
    assert type(head) is nn.Linear and head.weight is table.weight  # still tied, in float
    said = [d.message for r in res.report.records for d in r.diagnostics if d.target == "lm_head"]
    assert said and "untie" in said[0] and "layers={'lm_head': int8}" in said[0]
    assert any(isinstance(m, QuantLinear) for m in res.model.modules())  # the other layers are quantized


def test_an_untied_head_is_packed_alone_and_its_table_stays_in_float():
    model, inputs = hf_model("llama_causal_lm")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    res = go.optimize(model, inputs, "quantize(lm_head=true)", measure=False, on_error="raise")
    assert isinstance(res.model.get_output_embeddings(), QuantLinear)
    assert type(res.model.get_input_embeddings()) is nn.Embedding


def test_saving_a_tied_packed_table_as_compressed_tensors_is_refused_with_the_way_out(tmp_path):
    model, inputs = _tied("llama_causal_lm")
    res = go.optimize(model, inputs, "quantize(lm_head=true)", measure=False, on_error="raise")
    with pytest.raises(NotLoadableError, match="lm_head=true"):
        res.model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()
