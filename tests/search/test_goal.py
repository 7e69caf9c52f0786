"""Goal: its text round-trips, a goal that cannot be searched fails before any work, saying why, and a decode goal
times generate()."""

import importlib.util

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.search.goal import Goal, GoalError
from graphopt.search.measure import Evaluator


def test_goal_text_round_trips_and_parses_lists():
    goal = Goal.parse("quality>=0.99, speedup>=3, runtime=onnxruntime, batches=[1,32], threads=[1,2], max_time=600")
    assert goal == Goal(quality=0.99, speedup=3, runtime="onnxruntime", batches=(1, 32), threads=(1, 2), max_time=600)
    assert Goal.parse(str(goal)) == goal
    assert str(Goal(ppl=1.05, objective="size")) == "ppl<=1.05,objective=size"
    assert Goal.parse("ppl<=1.05,objective=size,heal=0").heal == 0 and Goal(ppl=1.05).heal == 2
    compiled = Goal.parse("ppl<=1.05,speedup>=2,decode=8,compile=true")
    assert compiled.compile is True and Goal.parse(str(compiled)) == compiled and "compile=true" in str(compiled)


@pytest.mark.parametrize("text, says", [
    ("quality<=0.99", "write quality>=0.99"),
    ("speedup=3", "write speedup>=3"),
    ("qualty>=0.9", "did you mean 'quality'"),
    ("quality>=1.5", "must be in (0, 1]"),
    ("quality>=0.9,quality>=0.95", "given twice"),
    ("speedup>=2", "needs a quality= (or ppl=) floor"),
    ("quality>=0.9,objective=quality", "drop one"),
    ("quality>=0.9,runtime=tensorrt", "choose torch or onnxruntime"),
    ("quality>=0.9,batches=[0]", "batch sizes >= 1"),
    ("quality>=0.9,heal=-1", "trials, heal, refine, confirm and plans >= 0"),
    ("quality>=0.9,refine=-1", "trials, heal, refine, confirm and plans >= 0"),
    ("quality>=0.9,plans=-1", "trials, heal, refine, confirm and plans >= 0"),
    ("", "an empty goal"),
    ("fast please", "write name>=value"),
])
def test_a_goal_that_cannot_be_searched_says_what_to_write(text, says):
    with pytest.raises(GoalError) as e:
        Goal.parse(text)
    assert says in str(e.value)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_optimize_refuses_bad_goals_before_building_anything(monkeypatch):
    model, x = _mlp(), torch.randn(2, 8)
    built = []
    monkeypatch.setattr(Evaluator, "measure", lambda self, pipeline: built.append(pipeline))
    with pytest.raises(GoalError, match="give pipeline= or goal=, not both"):
        go.optimize(model, x, "quantize", goal="quality>=0.9,objective=size")
    with pytest.raises(GoalError, match="needs eval_data="):
        go.optimize(model, x, goal="quality>=0.9,objective=size")
    with pytest.raises(GoalError, match="ppl= needs a language model's eval_data with input_ids"):
        go.optimize(model, x, goal="ppl<=1.05,objective=size", eval_data=[torch.randn(2, 8)])
    with pytest.raises(go.PipelineError, match="unknown pass 'prnue'"):
        go.optimize(model, x, goal="quality>=0.9,objective=size,passes=[prnue]", eval_data=[x])
    with pytest.raises(GoalError, match="fold_bn declares no choices to search; searchable passes: .*prune"):
        go.optimize(model, x, goal="quality>=0.9,objective=size,passes=[fold_bn]", eval_data=[x])
    with pytest.raises(GoalError, match=r"nothing to search: replace_blocks\(n=1,method=lstsq\) \(reads calibration data: "
                                        r"give calib=\)"):
        go.optimize(model, x, goal=Goal(quality=0.9, objective="size", passes=("replace_blocks",)), eval_data=[x])
    assert built == []


def test_a_runtime_that_is_not_installed_is_named_with_the_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(GoalError, match=r"runtime=onnxruntime needs onnxruntime: pip install 'graphopt\[onnx\]'"):
        go.optimize(_mlp(), torch.randn(2, 8), goal="quality>=0.9,runtime=onnxruntime", eval_data=[torch.randn(2, 8)])


@pytest.mark.parametrize("text, says", [
    ("ppl<=1.05,objective=speedup,decode=8,runtime=onnxruntime", "only runtime=torch has"),
    ("ppl<=1.05,objective=size,decode=8", "give speedup>= or objective=speedup"),
    ("ppl<=1.05,speedup>=1,decode=-1", "decode=-1"),
])
def test_a_decode_goal_that_cannot_be_timed_says_why(text, says):
    with pytest.raises(GoalError, match=says):
        Goal.parse(text)


def test_a_decode_goal_on_a_model_without_generate_is_refused_before_building(monkeypatch):
    built = []
    monkeypatch.setattr(Evaluator, "measure", lambda self, pipeline: built.append(pipeline))
    with pytest.raises(GoalError, match="decode=4 times generate\\(\\), which Sequential does not have"):
        go.optimize(_mlp(), torch.randn(2, 8), goal="quality>=0.9,speedup>=1,decode=4", eval_data=[torch.randn(2, 8)])
    assert built == []


def test_a_decode_goal_times_greedy_generation(monkeypatch):
    model, inputs = hf_model("llama_causal_lm")
    calls = []
    original = type(model).generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counting)
    res = go.optimize_for(model, inputs, "ppl<=100,objective=speedup,decode=3,passes=[drop_blocks],batches=[1],"
                          "threads=[1],heal=0", calib=[inputs] * 2, eval_data=[inputs], cache=False)
    points = [p for p in res.search.points if not p.failed]  # (drop_blocks(n=2) of 2 blocks is refused)
    assert len(points) == 2 and all(set(p.speedups) == {"decode 3, batch 1, 1 thread"} for p in points)
    assert calls and set(calls) == {3}  # generate(), 3 new tokens, is what was timed
    dropped = next(p for p in points if p.pipeline.endswith("drop_blocks"))
    assert dropped.speedup > 1.0  # one of the 2 blocks gone: each decoding step does less (1.26x measured)


@pytest.mark.parametrize("text, says", [
    ("ppl<=1.05,objective=speedup,compile=true,runtime=onnxruntime", "only runtime=torch has"),
    ("ppl<=1.05,objective=size,compile=true", "changes only how speed is timed"),
])
def test_a_compiled_goal_that_cannot_be_timed_says_why(text, says):
    with pytest.raises(GoalError, match=says):
        Goal.parse(text)


def test_a_compiled_decode_goal_times_compiled_decoding_of_the_examples_prompt(monkeypatch):
    """With compile=true, decode= times graphopt.compiled's decoder (the prompt, then compiled steps over a
    static KV cache) for the original and each candidate, never generate(); a padded prompt is refused first."""
    import graphopt.search.measure as measure

    model, inputs = hf_model("llama_causal_lm")
    made, steps = [], []

    def decoder(module, ids, n):  # what the search builds and times (the real one compiles: tests/test_compiled.py)
        made.append((module, ids.clone(), n))
        return lambda: steps.append(module)

    monkeypatch.setattr(measure, "compiled_decoder", decoder)
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("generate() was timed"))
    goal = ("ppl<=100,objective=speedup,decode=3,compile=true,passes=[drop_blocks],batches=[1],threads=[1],heal=0,"
            "confirm=0")
    res = go.optimize_for(model, inputs, goal, calib=[inputs] * 2, eval_data=[inputs], cache=False)
    points = [p for p in res.search.points if not p.failed]
    assert len(points) == 2 and all(set(p.speedups) == {"compiled, decode 3, batch 1, 1 thread"} for p in points)
    assert made[0][0] is model and all(n == 3 and torch.equal(ids, inputs["input_ids"][:1]) for _, ids, n in made)
    assert len(made) == 3 and {id(m) for m in steps} == {id(m) for m, _, _ in made}  # the original once, each candidate
    padded = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    padded["attention_mask"][1, 0] = 0  # the timed batches repeat the first sample: its padding is what counts
    go.optimize_for(model, padded, goal, calib=[inputs] * 2, eval_data=[inputs], cache=False)
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(GoalError, match="no padded positions"):
        go.optimize_for(model, padded, goal, calib=[inputs] * 2, eval_data=[inputs], cache=False)
