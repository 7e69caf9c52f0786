"""Shared test settings: deterministic, small thread count (CI has 2 cores)."""

import logging
import os
from pathlib import Path

# Triton runs kernels on CPU tensors only under its interpreter, which has to be on when triton is first
# imported (its standard library, tl.zeros and the like, is jitted then): before anything imports it, so
# nothing of graphopt (whose import loads torch.utils.flop_counter, which loads triton) before this line;
# hence the warning filter naming a graphopt class is added in pytest_configure, not in pyproject.toml.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=600, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(2)


def pytest_configure(config):
    # rollbacks are asserted by status where a test expects one (pytest.warns still sees the warning)
    config.addinivalue_line("filterwarnings", "ignore::graphopt.infra.manager.PassRolledBackWarning")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster and immune to other processes competing for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with the real MiniLM tokenizer, saved as a HuggingFace directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from graphopt.models import embedded_directory

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_directory("minilm")))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    directory = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
