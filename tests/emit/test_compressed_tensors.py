"""compressed-tensors checkpoints: written by save_pretrained for quantized HF models, reloaded by plain transformers."""

import json

import pytest
import torch
from safetensors import safe_open

import graphopt as go
from graphopt.emit.compressed_tensors import pack_int32
from graphopt.emit.hf import NotLoadableError
from graphopt.helpers.hf_reload import reload_with_transformers, write_for_reload
from graphopt.helpers.zoo import hf_model
from graphopt.nn.quant import QuantLinear

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"int4_gptq": "quantize(scheme=int4,group_size=16,method=gptq)",
         "int8": "quantize(scheme=int8)",
         "ternary": "quantize(scheme=ternary)",
         "mixed": "quantize(scheme=int4,group_size=16,budget_bits=6.5)",
         "w8a8_per_token": "quantize(scheme=w8a8,activations=per_token,alpha=0)"}


def _calib():
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g)} for _ in range(4)]


def test_pack_int32_layout():
    codes = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -2, 5]], dtype=torch.int8)
    words = pack_int32(codes, 4)
    assert words.shape == (1, 2) and words.dtype == torch.int32
    values = [(int(words[0, i // 8]) >> (4 * (i % 8))) & 0xF for i in range(9)]  # +8 at bit 4 * (i % 8)
    assert values == [int(c) + 8 for c in codes[0]]


def test_quantized_llama_reloads_with_plain_transformers(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    saved = {}
    for name, pipeline in CASES.items():
        res = go.optimize(model, inputs, pipeline, calib=_calib(), measure=False, on_error="raise")
        saved[name] = res.model
        write_for_reload(res.model, dict(inputs), tmp_path / name)
    # a control that must fail: the same int4 directory with one scale changed
    control = tmp_path / "control"
    write_for_reload(saved["int4_gptq"], dict(inputs), control)
    from safetensors.torch import load_file, save_file

    weights = load_file(control / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight_scale"] *= 2
    save_file(weights, control / "model.safetensors", metadata={"format": "pt"})

    config = json.loads((tmp_path / "int4_gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "lm_head" in config["ignore"]
    with safe_open(tmp_path / "int4_gptq" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    layer = saved["int4_gptq"].model.layers[0].mlp.up_proj
    assert packed.dtype == torch.int32 and packed.shape == (layer.out_features, layer.in_features // 8)
    w8a8 = json.loads((tmp_path / "w8a8_per_token" / "config.json").read_text())["quantization_config"]
    acts = w8a8["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == "token" and acts["dynamic"] and acts["num_bits"] == 8
    mixed = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert mixed["format"] == "mixed-precision" and len(mixed["config_groups"]) == 2

    results = reload_with_transformers(tmp_path, timeout=600)
    assert results.pop("graphopt imported") is False
    assert results.pop("control") > 1e-3, "a changed scale must show"
    # w8a8 rounds activations at run time: a float difference of one ulp (compressed-tensors multiplies
    # dequantized weights, graphopt integer codes) can flip a code, so its bound is looser
    assert results == {name: pytest.approx(0.0, abs=2e-3 if "w8a8" in name else 1e-4) for name in CASES}, results


def test_what_the_format_cannot_hold_is_refused_with_the_reason(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "quantize(scheme=w8a8,alpha=0.5)", calib=_calib(), measure=False,
                      on_error="raise")
    with pytest.raises(NotLoadableError, match="SmoothQuant"):
        res.model.save_pretrained(tmp_path / "w8a8")
    assert not (tmp_path / "w8a8").exists()
    gpt2, gpt2_inputs = hf_model("gpt2_lm_head")
    res = go.optimize(gpt2, gpt2_inputs, "quantize(scheme=int8)", measure=False, on_error="raise")
    with pytest.raises(NotLoadableError, match="Conv1D"):
        res.model.save_pretrained(tmp_path / "gpt2")
    assert isinstance(res.model.transformer.h[0].attn.c_attn, QuantLinear)


def test_a_quantized_save_that_fails_on_the_way_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    """The config rewrite once ran in place after transformers had written the weights: a failure there left
    weights whose config lacked quantization_config, which loads as a float model with random layers."""
    import graphopt.emit.compressed_tensors as ct

    model, inputs = hf_model("llama_causal_lm")
    first = go.optimize(model, inputs, "quantize(scheme=int8)", measure=False, on_error="raise").model
    second = go.optimize(model, inputs, "quantize(scheme=int4,group_size=16)", measure=False,
                         on_error="raise").model
    first.save_pretrained(tmp_path / "q")
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}

    def broken(model):
        raise OSError("disk full")

    monkeypatch.setattr(ct, "quantization_config", broken)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path / "q")
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before  # the old save, whole
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
