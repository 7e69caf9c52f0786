"""The search's cost model: candidates' layers costed from the latency table on the goal's runtime, and a
combination's time predicted layer by layer (Amdahl's law) rather than by multiplying whole-model speed-ups."""

import time

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.infra.latency_table import LatencyTable
from graphopt.search.costs import LayerCosts, layer_calls
from graphopt.search.measure import Point
from graphopt.search.predict import layered_speedups, layered_time, predict, product_speedups
from tests.search.test_search import _register_wake, _Sleepy

KEY = "batch 1, 1 thread"


class _Slow(nn.Module):
    """A layer (it holds a buffer) whose time is a sleep of 1 ms per element of that buffer."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.001 * self.steps.numel())
        return x


class _Nap(_Sleepy):
    """Time that holds no tensor (the model's rest): a sleep of 5 ms, which ``wake`` removes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)
        return x


def _register_halve():
    @go.register_pass("halve", tolerance=None, change="halve", stage=40, choices=({},))
    def halve(program, am):
        """Replace each slow layer by one half as slow."""
        for name, m in list(program.module.named_modules()):
            if isinstance(m, _Slow):
                program.replace_module(name, _Slow(m.steps.numel() // 2))
        return go.PassResult(modified=True)


def test_the_layer_model_compounds_two_changes_only_where_both_act():
    # the base: two layers of 4 ms and a rest of 2 ms; q makes the layers 4x faster, p halves the rest
    base = {"a": 4.0, "b": 4.0}
    q = (4.0 / 10.0, {"a": 1.0, "b": 1.0})  # 2 + 2 = 4 ms: 2.5x
    p = (9.0 / 10.0, {"a": 4.0, "b": 4.0})  # 8 + 1 = 9 ms
    assert layered_time(10.0, base, [q]) == pytest.approx(0.4)  # a single change is its own measurement
    assert layered_time(10.0, base, [p]) == pytest.approx(0.9)
    assert layered_time(10.0, base, [q, p]) == pytest.approx(0.3)  # 2 ms of layers + 1 ms of rest
    # a layer a change removes costs nothing; a layer it adds joins; one not timed alone stays in the rest
    assert layered_time(10.0, base, [(0.6, {"a": 4.0})]) == pytest.approx(0.6)
    assert layered_time(10.0, base, [(0.6, {"a": 4.0}), q]) == pytest.approx(0.2 + 0.1)
    assert layered_time(10.0, base, [(1.1, {"a": 4.0, "b": 4.0, "new": 1.0}), q]) == pytest.approx(0.5)
    # b not timed alone: its 4 ms join the rest, whose ratio each change then takes as a whole (q: 6 -> 3 ms,
    # p: 6 -> 5 ms; 6 x 1/2 x 5/6 = 2.5 ms), beside a's 1 ms
    assert layered_time(10.0, {"a": 4.0, "b": None}, [q, p]) == pytest.approx(0.35)
    assert layered_time(10.0, {"a": None}, [q]) is None


def test_a_combination_is_predicted_relative_to_the_clean_ups_every_change_already_holds():
    base = Point("default", quality=1.0, size=0.9, speedups={KEY: 1.2})
    a = Point("default,a", quality=0.99, size=0.45, speedups={KEY: 2.4})
    b = Point("default,b", quality=0.98, size=0.9, speedups={KEY: 1.8})
    combo = predict((), {}, base)
    assert combo.speedups == {KEY: 1.2} and combo.size == 0.9
    assert product_speedups([a, b], base)[KEY] == pytest.approx(1.2 * 2 * 1.5)  # (not 2.4 x 1.8: 1.2 once)
    assert layered_speedups([a, b], base) is None  # no layer profiles: the speed-ups multiply


def test_a_profile_costs_every_layer_called_by_its_kind_shape_and_layout(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = go.ExampleInputs((torch.randn(1, 3, 16, 16),))
    costs = LayerCosts("torch", table=LatencyTable(tmp_path / "latency.json"))
    times = costs.profile(model, x, threads=1)
    assert set(times) == {"0", "2"} and all(t > 0 for t in times.values())  # (the ReLU holds no tensor)
    assert costs.table.measured == 2
    costs.profile(model, x, threads=1)
    assert costs.table.measured == 2  # the same layers again: read from the table
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    costs.profile(model, x, threads=1)
    assert costs.table.measured == 3  # a layout is another kind of layer
    costs.save()
    assert len(LatencyTable(tmp_path / "latency.json").entries) == 3


def test_a_runner_without_a_thread_count_is_given_the_current_one(tmp_path):
    """(A typo once made this call raise, which the table took for a layer that does not run alone.)"""
    given = []

    def runner(layer, inputs, threads):
        given.append(threads)
        return lambda: inputs.call(layer)

    table = LatencyTable(tmp_path / "latency.json")
    ms = table.ms_of(nn.Linear(8, 8), (((2, 8), "float32"),), runtime="other", runner=runner)
    assert ms is not None and ms > 0 and given == [torch.get_num_threads()]


def test_a_decoding_profile_counts_the_prompt_once_and_each_step_on_one_token():
    model, _ = hf_model("llama_causal_lm")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    calls = layer_calls(model, go.ExampleInputs(kwargs={"input_ids": ids}), decode=5)
    q = calls["model.layers.0.self_attn.q_proj"]
    assert [s[0][0][:2] for s in q] == [(1, 12)] + [(1, 1)] * 4
    assert [s[0][0][:2] for s in calls["lm_head"]] == [(1, 1)] * 5  # the prompt's logits: its last position only


def test_layers_are_timed_alone_in_onnxruntime(tmp_path):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    costs = LayerCosts("onnxruntime", table=LatencyTable(tmp_path / "latency.json"), export_dir=tmp_path)
    x = go.ExampleInputs((torch.randn(4, 32),))
    times = costs.profile(model, x, threads=1)
    assert set(times) == {"0", "2"} and all(t > 0 for t in times.values())
    assert all(key.startswith('["onnxruntime"') for key in costs.table.entries)
    costs.profile(model, x, threads=2)
    assert costs.table.measured == 4  # each layer at each thread count
    assert len(list(tmp_path.glob("layer*.onnx"))) == 2  # from one file per layer


def test_the_search_predicts_a_combination_layer_by_layer_and_checks_it_against_its_measurement(own_registry):
    _register_wake()
    _register_halve()
    model = nn.Sequential(_Slow(2), _Nap(), _Slow(2), _Nap()).eval()  # layers 4 ms, rest 10 ms
    goal = "quality>=0.9,passes=[wake,halve],batches=[1],threads=[1],confirm=0"
    found = go.optimize_for(model, torch.randn(2, 16), goal, eval_data=[torch.randn(2, 16)], cache=False).search
    point = {p.pipeline.removeprefix("remove_dropout,fold_bn"): p for p in found.points}
    base, wake, halve, both = point[""], point[",wake(n=2)"], point[",halve"], point[",wake(n=2),halve"]
    assert set(halve.layers[KEY]) == {"0", "2"} and halve.layers[KEY]["0"] == pytest.approx(1.0, rel=0.3)
    layered = layered_speedups([wake, halve], base)[KEY]
    product = product_speedups([wake, halve], base)[KEY]
    # the truth: 2 ms of layers left of 14 (7x); multiplying wake's 3.5x by halve's 1.17x says 4.1x
    assert both.speedup == pytest.approx(7.0, rel=0.2)
    assert layered == pytest.approx(both.speedup, rel=0.2)
    assert product < 0.7 * both.speedup
    assert any(n.startswith("cost model checked on the") for n in found.notes)
