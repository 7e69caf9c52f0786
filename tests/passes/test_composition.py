"""Every pair of built-in passes, in the order they compose in (``graphopt.passes.ORDER``), runs with default
options on HF models none of them was written for: no rollback, nothing changed without a reason, and the
result saves and loads back to the same outputs (issue 26)."""

import itertools
import warnings

import pytest
import torch

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.passes import ORDER

MODELS = ("llama_causal_lm", "bert", "resnet")  # a decoder LM, an encoder and a CNN: every pass has work


def _calib(model, inputs, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {k: v.clone() for k, v in inputs.items()}
        if "input_ids" in batch:
            batch["input_ids"] = torch.randint(0, model.config.vocab_size, batch["input_ids"].shape, generator=g)
        if "pixel_values" in batch:
            batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=g)
        out.append(batch)
    return out


def _first_float(output):
    return next(t for t in (output.values() if hasattr(output, "values") else output)
                if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_the_order_names_every_built_in_pass():
    built_in = [name for name, cls in go.list_passes().items() if cls.__module__.startswith("graphopt.passes.")]
    assert sorted(ORDER) == sorted(built_in)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_pair_in_order_composes_with_default_options(name, tmp_path):
    model, inputs = hf_model(name, layers=3)
    calib, fresh = _calib(model, inputs), _calib(model, inputs, n=1, seed=9)[0]
    problems = []
    for first, second in itertools.combinations(ORDER, 2):
        text = f"{first},{second}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", go.PassRolledBackWarning)
            try:
                res = go.optimize(model, inputs, text, calib=calib, measure=False)
            except go.PassRolledBackWarning as w:
                problems.append(f"{text}: {str(w).splitlines()[0]}")
                continue
        silent = [d.message for r in res.report.passes for d in r.diagnostics if "gave no reason" in d.message]
        if silent:
            problems.append(f"{text}: {silent[0]}")
        with torch.no_grad():
            out = _first_float(res.model(**fresh))
            if not bool(out.isfinite().all()):
                problems.append(f"{text}: outputs on fresh inputs are not finite")
            go.save(res, tmp_path / text)
            loaded = go.load(tmp_path / text, hf_model(name, layers=3, seed=7)[0])
            if not torch.equal(_first_float(loaded(**fresh)), out):
                problems.append(f"{text}: the saved model loads with other outputs")
    assert not problems, "\n".join(problems)
