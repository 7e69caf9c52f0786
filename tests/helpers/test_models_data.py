"""Model specs (graphopt.models) and the stdlib-docstring text corpus (graphopt.data)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from graphopt.data import CorpusError, file_texts, load_texts, stdlib_texts, text_batches
from graphopt.helpers import models
from graphopt.helpers import texts as data
from graphopt.helpers.zoo import hf_model
from graphopt.models import ModelSpecError, load_model_spec, resolve_model_spec


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.embedded_directory("minilm")))


# --- the corpus ---------------------------------------------------------------------------------------

def test_calib_and_eval_splits_are_disjoint_and_non_empty():
    calib, evaluation = stdlib_texts(split="calib"), stdlib_texts(split="eval")
    assert len(calib) > 500 and len(evaluation) > 100
    assert not set(calib) & set(evaluation)
    assert len(calib) > 2 * len(evaluation)  # the eval split is the smaller hold-out
    everything = stdlib_texts(split="all")
    assert sorted(everything) == sorted(calib + evaluation)
    lowered = [t.lower() for t in everything]
    assert len(set(lowered)) == len(lowered)  # deduplicated (case-insensitively)


def test_samples_are_deterministic_and_depend_on_seed():
    a, b = stdlib_texts(40, seed=1), stdlib_texts(40, seed=1)
    assert a == b
    assert stdlib_texts(40, seed=2) != a
    assert set(stdlib_texts(40, seed=1, split="eval")).isdisjoint(a)
    assert stdlib_texts(10, seed=1) == stdlib_texts(40, seed=1)[:10]  # a prefix: n only truncates


def test_samples_are_the_same_in_another_process():
    """No dependence on hash randomisation or import order."""
    code = "import hashlib; from graphopt.data import stdlib_texts; " \
           "print(hashlib.sha256('\\n'.join(stdlib_texts(50, seed=3, split='eval')).encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                           timeout=120).stdout.strip()
    here = hashlib.sha256("\n".join(stdlib_texts(50, seed=3, split="eval")).encode()).hexdigest()
    assert other == here


def test_texts_are_real_prose_from_docstrings():
    texts = stdlib_texts(split="all")
    for text in texts:
        words = text.split()
        assert data.MIN_WORDS <= len(words) <= data.MAX_WORDS, text
        assert text[0].isupper() and text[-1] in ".!?", text
        assert ">>>" not in text and "\n" not in text and "  " not in text, text
    # Every sampled text occurs verbatim (up to whitespace) in a docstring of the listed modules.
    sources = []
    for name in data.STDLIB_MODULES:
        sources += [re.sub(r"\s+", " ", inspect.cleandoc(doc)) for doc in data._docstrings(name)]
    haystack = "\n".join(sources)
    for text in stdlib_texts(60, seed=5, split="all"):
        assert text in haystack, text


def test_prose_filter_rejects_code_and_lists():
    assert data._is_prose("Return the number of items in the queue, which is not reliable.")
    assert not data._is_prose(">>> x = compute(1, 2)\n3")
    assert not data._is_prose("Arguments:\n    path -- the file to open and read from")
    assert not data._is_prose("foo_bar_baz(x=1) returns a_value when called.")
    assert not data._is_prose("short sentence.")
    assert not data._is_prose("this one starts lower case and runs on and on without an end")


def test_long_paragraphs_are_cut_at_sentence_ends():
    sentence = "This sentence has exactly eight words in it."
    chunks = list(data._chunks(" ".join([sentence] * 30)))
    assert all(len(c.split()) <= data.MAX_WORDS for c in chunks)
    assert all(c.endswith(".") and c.startswith("This") for c in chunks)
    assert sum(len(c.split()) for c in chunks) == 30 * 8


def test_asking_for_too_many_or_bad_split_is_a_clear_error():
    size = len(stdlib_texts(split="eval"))
    with pytest.raises(CorpusError, match=f"has {size} texts, {size + 1} were asked for"):
        stdlib_texts(size + 1, split="eval")
    with pytest.raises(CorpusError, match="at least 1"):
        stdlib_texts(0)
    with pytest.raises(CorpusError, match="split must be"):
        stdlib_texts(5, split="test")  # type: ignore[arg-type]


def test_file_texts_one_per_non_empty_line(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("  first line \n\nsecond line\n   \nthird\n", encoding="utf-8")
    assert file_texts(path) == ["first line", "second line", "third"]
    assert sorted(file_texts(path, 2, seed=0)) == sorted(file_texts(path, 2, seed=0))
    assert set(file_texts(path, 3, seed=4)) == {"first line", "second line", "third"}
    assert load_texts(str(path)) == file_texts(path)
    assert load_texts("docstrings", 5, seed=1) == stdlib_texts(5, seed=1, split="calib")
    with pytest.raises(CorpusError, match="does not exist"):
        file_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="no non-empty lines"):
        file_texts(tmp_path / "empty.txt")


def test_text_batches_pad_truncate_and_keep_order(tokenizer):
    texts = stdlib_texts(10, seed=0)
    batches = list(text_batches(tokenizer, texts, batch_size=4, max_length=16))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    for start, batch in zip(range(0, 10, 4), batches):
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 16
        for row, text in enumerate(texts[start:start + 4]):
            full = tokenizer(text)["input_ids"]
            n = int(batch["attention_mask"][row].sum())
            assert n == min(len(full), 16)
            assert batch["input_ids"][row, : n - 1].tolist() == full[: n - 1]  # same text, same order
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    short = next(text_batches(tokenizer, ["A short one.", "A considerably longer text with many more words."],
                              batch_size=2, max_length=64))
    assert short["attention_mask"][0].sum() < short["attention_mask"][1].sum()  # padding is masked
    assert short["attention_mask"][1].all()


def test_text_batches_reject_a_tokenizer_without_pad_token():
    class NoPad:
        pad_token = None

    with pytest.raises(ValueError, match="no pad token"):
        next(text_batches(NoPad(), ["Some text here."]))


# --- model specs --------------------------------------------------------------------------------------

def test_embedded_minilm_resolves_to_the_packaged_directory():
    resolved = resolve_model_spec("minilm")
    assert resolved.kind == "embedded"
    config = json.loads((Path(resolved.target) / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "ghost", ("graphopt_no_such_pkg", "gt-ghost", "Ghost"))
    with pytest.raises(ModelSpecError, match="package gt-ghost is not installed: pip install gt-ghost"):
        load_model_spec("ghost")


@pytest.mark.parametrize("spec, message", [
    ("", "empty model spec"),
    ("bert-base-uncased", "unknown model spec 'bert-base-uncased'"),
    ("./nowhere/model", "no such directory: ./nowhere/model"),
    ("bad-module:make", "'bad-module' is not a module path"),
    ("nowhere.py:make", "no such file: nowhere.py"),
])
def test_bad_specs_fail_before_loading(spec, message):
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        resolve_model_spec(spec)


def test_directory_checks(tmp_path):
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model_spec(str(tmp_path))
    (tmp_path / "graphopt.json").write_text("{}")
    with pytest.raises(ModelSpecError, match="saved by graphopt; load it in Python with graphopt.load"):
        load_model_spec(str(tmp_path))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelSpecError, match="is a file"):
        load_model_spec(str(tmp_path / "weights.bin"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    with pytest.raises(ModelSpecError, match="cannot load .* with transformers: "):
        load_model_spec(str(broken))


def test_hf_directory_with_tokenizer_gets_tokenised_sentences(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model_spec(str(tmp_path))
    assert type(loaded.model) is BertModel and not loaded.model.training
    assert loaded.tokenizer is not None
    expected = tokenizer(list(models.EXAMPLE_SENTENCES), padding=True, return_tensors="pt")
    assert torch.equal(loaded.example_inputs["input_ids"], expected["input_ids"])
    assert not loaded.example_inputs["attention_mask"].all()  # sentences of different lengths: padding
    torch.testing.assert_close(loaded.model(**loaded.example_inputs).last_hidden_state,
                               model.eval()(**loaded.example_inputs).last_hidden_state)
    assert loaded.description.startswith(f"{tmp_path} (BertModel, ")


@pytest.mark.parametrize("name, key, shape", [
    ("vit", "pixel_values", (2, 3, 32, 32)),  # image_size and num_channels from the config
    ("resnet", "pixel_values", (2, 3, models.DEFAULT_IMAGE_SIZE, models.DEFAULT_IMAGE_SIZE)),
    ("gpt2", "input_ids", (2, 16)),  # no tokenizer: token ids below the config's vocab_size
])
def test_hf_directory_without_tokenizer_gets_inputs_from_config(tmp_path, name, key, shape):
    model, _ = hf_model(name)
    model.save_pretrained(tmp_path)
    loaded = load_model_spec(str(tmp_path))
    assert loaded.tokenizer is None
    assert tuple(loaded.example_inputs[key].shape) == shape
    if key == "input_ids":
        assert int(loaded.example_inputs[key].max()) < model.config.vocab_size
        assert loaded.model.config.use_cache is model.config.use_cache  # as saved: capture turns caches off itself
    with torch.no_grad():
        loaded.model(**loaded.example_inputs)  # the inputs fit the model


def test_hf_directory_keeps_the_saved_class_and_its_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    model.save_pretrained(tmp_path)
    loaded = load_model_spec(str(tmp_path))
    assert type(loaded.model) is BertForSequenceClassification
    with torch.no_grad():
        logits = loaded.model(**loaded.example_inputs).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, model.eval()(**loaded.example_inputs).logits)


FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def pair():
        return nn.Linear(3, 2), torch.ones(1, 3)

    def bare():
        return nn.Linear(3, 2)

    def hf():
        from graphopt.helpers.zoo import hf_model
        return hf_model("bert")[0]

    def three():
        return nn.Linear(3, 2), torch.ones(1, 3), None

    def raises():
        raise RuntimeError("out of cheese")

    value = 3

    class Namespace:
        @staticmethod
        def make():
            return nn.Linear(4, 1).train(), torch.ones(2, 4)
''')


@pytest.fixture
def factory_file(tmp_path, monkeypatch):
    path = tmp_path / "spec_factories.py"
    path.write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "spec_factories", raising=False)
    return path


def test_factory_specs(factory_file):
    model, inputs, tok, description = load_model_spec("spec_factories:pair")
    assert isinstance(model, nn.Linear) and torch.equal(inputs, torch.ones(1, 3)) and tok is None
    assert description == "spec_factories:pair (Linear, 8 parameters)"
    model, inputs, _, _ = load_model_spec("spec_factories:Namespace.make")  # dotted attribute
    assert model.in_features == 4 and not model.training  # put in eval mode
    model, inputs, _, _ = load_model_spec(f"{factory_file}:pair")  # file.py:factory
    assert isinstance(model, nn.Linear)
    model, inputs, _, _ = load_model_spec("spec_factories:hf")  # HF model alone: inputs from its config
    assert inputs["input_ids"].shape == (2, 16) and int(inputs["input_ids"].max()) < model.config.vocab_size


@pytest.mark.parametrize("attr, message", [
    ("bare", "returned a Linear without example inputs; return (model, example_inputs) instead"),
    ("three", "returned a tuple of 3 (Linear, Tensor, NoneType), expected nn.Module or (model, example_inputs)"),
    ("raises", "factory spec_factories:raises() raised RuntimeError: out of cheese"),
    ("value", "spec_factories:value is not callable (int 3); name a function that returns"),
    ("missing", "spec_factories has no attribute 'missing'"),
])
def test_factory_errors_are_one_line_and_say_what_to_return(factory_file, attr, message):
    with pytest.raises(ModelSpecError) as info:
        load_model_spec(f"spec_factories:{attr}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_factory_module_not_found_names_the_module():
    with pytest.raises(ModelSpecError, match="no module named 'graphopt_nothing_here'"):
        load_model_spec("graphopt_nothing_here.sub:make")


def test_a_directory_whose_weights_do_not_match_its_config_is_refused(tmp_path):
    """A failed save once left config.json without its quantization_config: loading built a float model whose
    Linear weights were freshly initialised (0.92 off), with no error."""
    from safetensors.torch import load_file, save_file

    from graphopt.helpers.models import ModelSpecError, load_model_spec
    from graphopt.helpers.zoo import hf_model

    model, _ = hf_model("llama_causal_lm")
    model.save_pretrained(tmp_path / "m")
    assert load_model_spec(str(tmp_path / "m"))  # as written, it loads
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelSpecError, match=r"weights do not match its config.json .*1 tensor\(s\) not in the "
                                             r"weights .*model.layers.0.mlp.up_proj.weight"):
        load_model_spec(str(tmp_path / "m"))
