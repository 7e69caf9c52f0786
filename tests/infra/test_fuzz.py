"""Fuzzing the entry points: any text or object given as a pipeline, a pass option or an optimize()
argument gives a result or graphopt's own clear error, never an exception from deep inside (issue 10)."""

import copy
import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import InputError
from graphopt.infra.pipeline import as_pipeline

TOKENS = ["prune", "heal", "dyt", "quantize", "fold_bn", "remove_dropout", "default", "(", ")", "[", "]", ",", "=",
          "ratio", "steps", "where", "scheme", "alpha0", "0.5", "-1", "1e9", "nan", "inf", "true", "none", "'x'",
          '"', "'", " ", "*", "int4", "prune(", "[[", "]]", "\\", "\n", "é"]
pipeline_texts = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(TOKENS), max_size=25).map("".join))
objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3),
    max_leaves=12)


@settings(max_examples=300)
@given(pipeline_texts)
def test_any_text_parses_and_round_trips_or_raises_pipeline_error(text):
    try:
        pipeline = go.parse_pipeline(text)
    except go.PipelineError as e:
        assert str(e)
        return
    assert go.parse_pipeline(str(pipeline)) == pipeline


@settings(max_examples=200)
@given(objects)
def test_any_object_as_a_pipeline_raises_pipeline_error(obj):
    try:
        as_pipeline(obj)
    except go.PipelineError as e:
        assert str(e)


@given(st.sampled_from(["prune", "heal", "dyt", "quantize"]), st.data())
def test_any_option_value_is_accepted_or_refused_with_pipeline_error(name, data):
    cls = go.get_pass(name)
    fields = [f.name for f in dataclasses.fields(cls)]  # (__dataclass_fields__ lists ClassVars too)
    option = data.draw(st.sampled_from(fields))
    value = data.draw(objects)
    try:
        p = cls(**{option: value})
    except go.PipelineError as e:
        assert option in str(e)
        return
    assert go.parse_pipeline(str(p)) == go.Pipeline([p])


def test_deep_nesting_is_refused_not_a_recursion_error():
    for text in ["prune(where=" + "[" * 5000 + "]" * 5000 + ")", "(" * 5000, "prune" + "(" * 3000 + ")" * 3000]:
        try:
            go.parse_pipeline(text)
        except go.PipelineError:
            continue
        raise AssertionError(f"{text[:20]}... parsed")
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    for obj in (deep, {"a": deep}):
        try:
            as_pipeline(obj)
        except go.PipelineError:
            continue
        raise AssertionError("a nested list became a pipeline")


ARGUMENTS = ["pipeline", "calib", "inplace", "verify", "measure", "on_error", "progress", "model_spec"]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(ARGUMENTS), objects | st.just(torch.randn(3, 5)), max_size=3))
def test_optimize_arguments_are_checked_and_the_model_is_untouched(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.1), nn.Linear(4, 2)).eval()
    state = copy.deepcopy(model.state_dict())
    kwargs.setdefault("pipeline", "remove_dropout")
    if kwargs.get("measure") is True:
        kwargs["measure"] = False  # timing runs are slow and beside the point here
    kwargs.setdefault("measure", False)
    try:
        res = go.optimize(model, torch.randn(3, 5), **kwargs)
        assert isinstance(res.model, nn.Module)
    except (go.PipelineError, InputError, TypeError, ValueError) as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        assert "graphopt" in tb.tb_frame.f_code.co_filename, f"raised from {tb.tb_frame.f_code.co_filename}: {e!r}"
    if kwargs.get("inplace") is not True:
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
