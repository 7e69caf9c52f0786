"""HuggingFace models as users hold them: default configs (KV caches on), task heads, generate(), and a
reload with plain transformers in a process that never imports graphopt."""


import copy

import pytest
import torch

import graphopt as go
from graphopt.emit.hf import NotLoadableError
from graphopt.frontend.kv_cache import returned_cache
from graphopt.helpers.hf_reload import reload_with_transformers, write_for_reload
from graphopt.helpers.zoo import TASK_ZOO, ZOO, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

DECODERS = ["gpt2", "opt", "llama", "mistral", "qwen2", "phi3", "gemma", "falcon", "bloom"]
CAUSAL_LMS = ["llama_causal_lm", "gpt2_lm_head", "qwen2_causal_lm"]
BUILT_IN = ["remove_dropout", "fold_bn", "prune(ratio=0.5)", "dyt(mode=init)", "heal(steps=2)"]


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_with_its_default_config_prunes(name):
    model, inputs = hf_model(name)
    before = _params(model)
    res = go.optimize(model, inputs, "prune(ratio=0.5)", measure=False)
    assert res.report.records[-1].status == "ok", res.report.records[-1].reason
    assert _params(res.model) < before and _params(model) == before
    if name in DECODERS:
        assert model.config.use_cache is True and res.model.config.use_cache is True  # as users hold them
        with torch.no_grad():
            out = res.model(**inputs)
        assert "Cache" in type(returned_cache(out)).__name__  # the user's model still returns its KV cache
        assert res.report.outputs == [f"last_hidden_state{list(out.last_hidden_state.shape)}"]


@pytest.mark.parametrize("use_cache", [True, False])
def test_capture_and_analyze_either_way(use_cache):
    model, inputs = hf_model("llama", use_cache=use_cache)
    program = go.analyze(model, inputs)
    assert len(program.dependency_groups) > 0
    assert model.config.use_cache is use_cache


@pytest.mark.parametrize("name", list(TASK_ZOO))
def test_task_heads_optimize_and_report_what_they_compare(name):
    model, inputs = hf_model(name)
    res = go.optimize(model, inputs, "remove_dropout,prune(ratio=0.5)", measure=False, on_error="raise")
    assert all(r.status in ("ok", "unchanged") for r in res.report.passes)
    compared = ", ".join(res.report.outputs)
    assert compared.startswith("logits[") and "cache" not in compared
    assert "outputs compared: logits[" in str(res.report)
    assert type(res.model) is type(model)


@pytest.mark.parametrize("name", [*CAUSAL_LMS, "t5"])
@pytest.mark.parametrize("pipeline", BUILT_IN)
def test_generate_after_every_built_in_pass(name, pipeline):
    model, inputs = hf_model(name)
    prompt = inputs["input_ids"][:1, :5]
    res = go.optimize(model, inputs, pipeline, calib=[inputs], measure=False)
    assert res.report.records[-1].status in ("ok", "unchanged"), res.report.records[-1].reason
    assert res.model.config.use_cache is True
    with torch.no_grad():
        got = res.model.generate(prompt, max_new_tokens=6, do_sample=False)
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.shape == want.shape
    if pipeline in ("remove_dropout", "fold_bn"):  # exact passes: the same greedy tokens
        assert torch.equal(got, want)


def test_export_onnx_of_a_default_config_causal_lm(tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "prune(ratio=0.5)", measure=False, on_error="raise")
    report = res.export_onnx(tmp_path / "lm.onnx")
    assert report.verified and list(report.outputs) == ["logits"]
    assert res.model.config.use_cache is True


# --- reload with plain transformers -------------------------------------------------------------------

RELOAD = ["bert", "gpt2_lm_head", "llama_causal_lm", "qwen2_causal_lm", "vit", "t5"]


def _reload_in_plain_transformers(root) -> dict[str, float]:
    results = reload_with_transformers(root, timeout=300)
    assert results.pop("graphopt imported") is False
    return results


def test_reloadable_prune_reloads_with_plain_transformers(tmp_path):
    expected_config = {"bert": {"intermediate_size": 32}, "gpt2_lm_head": {"n_inner": 64},
                       "llama_causal_lm": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32},
                       "qwen2_causal_lm": {"num_attention_heads": 2, "num_key_value_heads": 1},
                       "vit": {"num_attention_heads": 2, "head_dim": 8, "intermediate_size": 32},
                       "t5": {"num_heads": 2, "d_ff": 32}}
    for name in RELOAD:
        model, inputs = hf_model(name)
        res = go.optimize(model, inputs, "prune(ratio=0.5,reloadable=true)", measure=False, on_error="raise")
        assert _params(res.model) < _params(model), name
        for key, value in expected_config[name].items():
            assert getattr(res.model.config, key) == value, (name, key)
        assert not res.report.notes, res.report.notes
        assert model.config.to_dict() == hf_model(name)[0].config.to_dict()  # the caller's config is untouched
        assert [e.op for e in res.program.edits].count("set_config") >= len(expected_config[name])
        write_for_reload(res.model, inputs, tmp_path / name)
    errors = _reload_in_plain_transformers(tmp_path)
    assert set(errors) == set(RELOAD)
    assert all(err < 1e-5 for err in errors.values()), errors


def test_the_default_preset_keeps_save_pretrained_and_reloads_in_plain_transformers(tmp_path):
    """remove_dropout swaps Dropout for Identity; the config builds Dropout again, which is the same in eval mode."""
    for name in ("bert", "gpt2_lm_head", "llama_causal_lm"):
        model, inputs = hf_model(name)
        res = go.optimize(model, inputs, "default", measure=False, on_error="raise")
        if name != "llama_causal_lm":  # (Llama's attention dropout is a float, not a module)
            assert res.report.passes[0].stats["removed"] > 0, name
        assert not any(isinstance(m, torch.nn.Dropout) for m in res.model.modules()), name
        write_for_reload(res.model, inputs, tmp_path / name)
    errors = _reload_in_plain_transformers(tmp_path)
    assert set(errors) == {"bert", "gpt2_lm_head", "llama_causal_lm"}
    assert all(err < 1e-5 for err in errors.values()), errors


def test_the_refusals_advice_works_after_remove_dropout(tmp_path):
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "remove_dropout,prune(ratio=0.5,reloadable=true)", measure=False,
                      on_error="raise")
    write_for_reload(res.model, inputs, tmp_path / "bert")
    assert _reload_in_plain_transformers(tmp_path)["bert"] < 1e-5


def _gqa_llama(hidden=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=64, num_hidden_layers=2)
    return LlamaForCausalLM(config).eval(), {"input_ids": torch.randint(0, 128, (2, 8))}


def test_reloadable_prune_proposes_only_configs_that_validate_and_reload(tmp_path):
    """transformers 5.25 validates hidden_size % heads on save: a pruned hidden size of 58 once raised there."""
    from graphopt.analysis.hf_config import validate_config

    model, inputs = _gqa_llama()
    res = go.optimize(model, inputs, "prune(ratio=0.4,reloadable=true)", measure=False, on_error="raise")
    assert _params(res.model) < _params(model)
    validate_config(res.model.config)
    write_for_reload(res.model, inputs, tmp_path / "llama")
    assert _reload_in_plain_transformers(tmp_path)["llama"] < 1e-5


def test_config_fits_skip_configs_their_validators_refuse(monkeypatch):
    """Whatever the installed transformers checks: a config whose validate() raises is never proposed."""
    from transformers import LlamaConfig

    from graphopt.analysis.hf_config import fit_config, tensor_shapes

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    model, _ = _gqa_llama()
    narrow = copy.deepcopy(model.config)
    narrow.hidden_size, narrow.head_dim = 58, 16  # heads kept whole, the residual width cut to 58
    with torch.device("meta"):
        target = tensor_shapes(type(model)(narrow))
    monkeypatch.setattr(LlamaConfig, "validate", lambda self: None, raising=False)
    assert fit_config(model, target).changes["hidden_size"] == 58  # describable, without the validator
    monkeypatch.setattr(LlamaConfig, "validate", validate)
    fit = fit_config(model, target)
    assert not fit.ok and "hidden_size" not in fit.changes


def test_reloadable_keeps_what_the_config_cannot_describe_and_says_so():
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "prune(ratio=0.5,reloadable=true)", measure=False, on_error="raise")
    layer = res.model.encoder.layer[0]
    assert layer.attention.self.query.out_features == 32  # BERT derives the head size: heads stay whole
    assert layer.intermediate.dense.out_features == 32
    kept = [d for d in res.report.records[-1].diagnostics if "kept whole" in d.message]
    assert kept and "head" in kept[0].message and "cannot describe" in kept[0].message


def test_per_layer_sizes_refuse_save_pretrained_with_the_way_out(tmp_path):
    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "prune(ratio=0.5,allocation=global)", measure=False, on_error="raise")
    assert any("save_pretrained refused" in n for n in res.report.notes)
    with pytest.raises(NotLoadableError, match=r"encoder\.layer\.\d.*go\.save.*reloadable=true"):
        res.model.save_pretrained(tmp_path / "bert")
    assert not (tmp_path / "bert").exists()  # nothing half-written
    go.save(res, tmp_path / "graphopt")  # the way out works
    loaded = go.load(tmp_path / "graphopt", hf_model("bert", seed=3)[0])
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).last_hidden_state, res.model(**inputs).last_hidden_state)


def test_dyt_refuses_save_pretrained(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "dyt(mode=init)", measure=False, on_error="raise")
    with pytest.raises(NotLoadableError, match="DyT"):
        res.model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "original")  # the caller's model is not affected
    assert (tmp_path / "original" / "config.json").exists()


def test_go_load_replays_config_edits_and_the_result_saves_pretrained(tmp_path):
    model, inputs = hf_model("llama_causal_lm")
    res = go.optimize(model, inputs, "prune(ratio=0.5,reloadable=true)", measure=False, on_error="raise")
    go.save(res, tmp_path / "g")
    base = hf_model("llama_causal_lm", seed=7)[0]
    loaded = go.load(tmp_path / "g", base)
    assert loaded.config.num_key_value_heads == 1 and loaded.config.intermediate_size == 32
    write_for_reload(loaded, inputs, tmp_path / "hf" / "llama")
    errors = _reload_in_plain_transformers(tmp_path / "hf")
    assert errors["llama"] < 1e-5


def test_reloadable_needs_uniform_allocation():
    model, inputs = hf_model("llama")
    res = go.optimize(model, inputs, "prune(reloadable=true,allocation=global)", measure=False)
    assert res.report.records[-1].status == "rolled back"
    assert "needs allocation=uniform" in res.report.records[-1].reason


# --- bad input ---------------------------------------------------------------------------------------------

def test_missing_forward_argument_is_named_before_any_pass():
    model, inputs = hf_model("t5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(go.VerificationError, match="does not run on its example inputs.*decoder_input_ids"):
        go.optimize(model, {"input_ids": inputs["input_ids"]}, "prune(ratio=0.5)", measure=False)
    with pytest.raises(go.CaptureError, match="decoder_input_ids"):
        go.capture(model, {"input_ids": inputs["input_ids"]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_set_config_on_a_model_without_config_is_refused():
    program = go.Program(torch.nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(go.EditError, match="no config"):
        program.set_config("hidden_size", 3)
    assert program.edits == []


def test_the_prune_note_and_the_save_refusal_count_the_same_problems(tmp_path):
    """They once said '... 77 more' and '... 59 more' about the same model."""
    import re

    model, inputs = hf_model("bert")
    res = go.optimize(model, inputs, "prune(ratio=0.5,allocation=global)", measure=False, on_error="raise")
    note = next(d.message for d in res.report.passes[0].diagnostics if d.target == "<config>")
    with pytest.raises(NotLoadableError) as refused:
        res.model.save_pretrained(tmp_path / "bert")
    counts = [re.search(r"\.\.\. (\d+) more", text).group(1) for text in (note, str(refused.value))]
    assert counts[0] == counts[1]
