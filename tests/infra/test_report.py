"""What the report tells the user (issue 11): labels, warnings, latency with its spread, the quality figure
in the user's terms, and a summary line."""

import math
import time

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import ExampleInputs
from graphopt.helpers.zoo import hf_model
from graphopt.infra.metrics import measure_latencies
from graphopt.infra.quality import summarize, task_quality
from graphopt.timing import interleaved_medians


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_labels_show_the_decisive_options_even_at_their_defaults():
    res = go.optimize(_mlp(), torch.randn(8, 16), "prune,remove_dropout", measure=False)
    assert [r.text for r in res.report.passes] == ["prune(ratio=0.3,importance=l2)", "remove_dropout"]
    assert str(res.pipeline) == "prune,remove_dropout"  # the canonical text stays short and round-trips
    assert go.parse_pipeline("quantize(int4,method=gptq)")[0].label() == "quantize(scheme=int4,method=gptq)"
    assert go.parse_pipeline("prune(target_flops=0.5)")[0].label() == "prune(target_flops=0.5,importance=l2)"


def test_a_rolled_back_pass_warns_by_default_and_result_is_not_ok():
    with pytest.warns(go.PassRolledBackWarning, match=r"pass heal\(.*\) was rolled back: ValueError: heal needs "
                                                      r"calibration data[\s\S]*reproduce: graphopt optimize"):
        res = go.optimize(_mlp(), torch.randn(8, 16), "heal", measure=False)
    assert not res.ok and res.report.failed[0].name == "heal"
    assert go.optimize(_mlp(), torch.randn(8, 16), "remove_dropout", measure=False).ok
    with pytest.raises(go.PassFailedError):
        go.optimize(_mlp(), torch.randn(8, 16), "heal", measure=False, on_error="raise")


def test_a_pass_that_changes_nothing_says_why():
    res = go.optimize(_mlp(), torch.randn(8, 16), "prune(ratio=0)", measure=False)
    assert res.report.passes[0].status == "unchanged"
    assert any("ratio=0 removes nothing" in d.message for d in res.report.passes[0].diagnostics)

    @go.register_pass("t_report_silent", replace=True)
    def silent(program, am):
        return go.PassResult(modified=False)

    res = go.optimize(_mlp(), torch.randn(8, 16), "t_report_silent", measure=False)
    assert "changed nothing and gave no reason" in res.report.passes[0].diagnostics[0].message


class _Sleeper(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.w = seconds, nn.Parameter(torch.ones(1))

    def forward(self, x):
        time.sleep(self.seconds)
        return x * self.w


def test_latency_is_timed_in_turn_with_the_reference_with_its_spread():
    x = ExampleInputs((torch.randn(2),), {})
    lat = measure_latencies(_Sleeper(0.004), x, _Sleeper(0.002), warmup=1, repeat=9)
    assert lat.runs == 9 and lat.threads == torch.get_num_threads()
    assert 1.5 < lat.ratio < 2.5 and lat.reference_ms == pytest.approx(2.0, rel=0.5)
    assert lat.ms == pytest.approx(4.0, rel=0.5) and 0 <= lat.spread < 0.5
    alone = measure_latencies(_Sleeper(0.001), x, warmup=0, repeat=5)
    assert alone.ratio is None and alone.runs == 5


def test_measure_true_times_ten_runs_not_one():
    res = go.optimize(_mlp(), torch.randn(8, 16), "prune(ratio=0.5)")  # measure=True, the default
    assert [r.latency_runs for r in res.report.records] == [10, 10]


def test_report_rows_carry_ratio_spread_threads_and_a_summary():
    res = go.optimize(_mlp(), torch.randn(8, 16), "prune(ratio=0.5)",
                      measure=go.Measure(latency_repeat=5))
    base, row = res.report.records
    assert base.latency_ratio is None and row.latency_ratio > 0 and row.latency_ratio_spread is not None
    assert row.threads == torch.get_num_threads() and base.latency_ms > 0
    text = str(res.report)
    assert "vs original" in text and "columns:" in text
    summary = res.report.summary()
    assert summary.startswith("summary: params ") and f"{row.params / 1e3:.2f}k" in summary
    assert "latency x" in summary and "output cosine" in summary and summary in text


@pytest.mark.parametrize("name, figure", [("bert", "sentence-embedding cosine"),
                                          ("bert_sequence_classification", "top-1 agreement"),
                                          ("llama_causal_lm", "next-token agreement"),
                                          ("resnet", "output cosine")])
def test_the_quality_figure_follows_the_model_kind(name, figure):
    model, inputs = hf_model(name)
    res = go.optimize(model, inputs, "prune(ratio=0.3)", measure=False)
    base, row = res.report.records
    assert base.quality == pytest.approx(1.0) and base.quality_name == figure
    assert row.quality_name == figure and 0.0 <= row.quality <= 1.0 + 1e-6
    assert row.quality_data == "the example inputs"


def test_the_quality_figure_uses_held_out_data_when_given():
    model, inputs = hf_model("bert")
    held = [{k: v[:1] for k, v in inputs.items()}, inputs]
    res = go.optimize(model, inputs, "prune(ratio=0.3)", measure=False, eval_data=held)
    row = res.report.records[1]
    assert row.quality_data == "3 held-out samples"
    with torch.no_grad():
        expected = task_quality([(summarize(res.model(**b), ExampleInputs((), b)),
                                  summarize(model(**b), ExampleInputs((), b))) for b in held])
    assert row.quality == pytest.approx(expected.value, abs=1e-6)
    assert "sentence-embedding cosine" in res.report.summary()


def test_top1_agreement_counts_changed_predictions():
    ref = {"logits": torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])}
    new = {"logits": torch.tensor([[2.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])}
    x = ExampleInputs((), {})
    q = task_quality([(summarize(new, x), summarize(ref, x))])
    assert (q.name, q.value) == ("top-1 agreement", 0.75)


def test_next_token_agreement_counts_only_unmasked_tokens():
    ref = {"logits": torch.zeros(1, 3, 4).index_fill_(2, torch.tensor([1]), 1.0)}  # predicts token 1 everywhere
    new = {"logits": ref["logits"].clone()}
    new["logits"][0, 2] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # the padded position disagrees
    x = ExampleInputs((), {"attention_mask": torch.tensor([[1, 1, 0]])})
    q = task_quality([(summarize(new, x), summarize(ref, x))])
    assert (q.name, q.value) == ("next-token agreement", 1.0)


def test_the_report_and_the_groups_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from graphopt.infra.plots import plot_groups

    res = go.optimize(_mlp(), torch.randn(8, 16), "prune(ratio=0.3),prune(ratio=0.3)",
                      measure=go.Measure(latency_repeat=3))
    path = res.report.plot(tmp_path / "report.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    groups = plot_groups(go.capture(_mlp(), torch.randn(8, 16)).analyses.get("dependency_graph"), tmp_path / "g.svg")
    assert "<svg" in groups.read_text()


def test_plotting_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = go.optimize(_mlp(), torch.randn(8, 16), "remove_dropout", measure=False)
    with pytest.raises(ImportError, match=r"pip install 'graphopt\[plot\]'"):
        res.report.plot(tmp_path / "r.png")


def test_sizes_are_in_one_unit_everywhere_mib():
    from graphopt.frontend.inspect import summarize as inspect_summary
    from graphopt.units import format_bytes

    assert format_bytes(90_860_544) == "86.65 MiB" and format_bytes(512) == "512 B" and format_bytes(None) == "-"
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512)).eval()  # 1 050 112 parameters: 4.01 MiB
    res = go.optimize(model, torch.randn(2, 512), "fold_bn", measure=True)
    text = str(res.report)
    assert "4.01 MiB" in text and "MB" not in text.replace("MiB", "")
    assert "weights 4.01 MiB -> 4.01 MiB" in res.report.summary()
    assert "4.01 MiB" in inspect_summary(go.analyze(model, torch.randn(2, 512)))


def test_a_pass_that_changes_the_outputs_gets_no_error_figure_and_later_rows_compare_with_its_outputs():
    """prune(outputs=true) halves an output: its row once said max rel err 0, cosine 1, quality 1 (lossless)."""
    model = _mlp()
    x = torch.randn(8, 16)
    res = go.optimize(model, x, "prune(ratio=0.5,outputs=true),quantize(scheme=int4,group_size=16)",
                      measure=False, on_error="raise")
    pruned, quantized = res.report.passes
    assert res.model(x).shape[-1] < model(x).shape[-1]
    assert (pruned.max_abs_err, pruned.max_rel_err, pruned.cosine, pruned.quality) == (None, None, None, None)
    assert any("no error or quality figure" in d.message for d in pruned.diagnostics)
    # the quantize row: its error against the pruned model's outputs (what it changed), not undefined
    pruned_only = go.optimize(model, x, "prune(ratio=0.5,outputs=true)", measure=False, on_error="raise").model
    with torch.no_grad():
        want = go.compare_outputs(res.model(x), pruned_only(x))
    assert want.max_rel > 0 and quantized.max_rel_err == pytest.approx(want.max_rel)
    assert quantized.cosine == pytest.approx(want.cosine) and quantized.quality is not None


def test_a_causal_lm_row_gives_the_perplexity_ratio_to_the_original():
    """exp(mean next-token cross-entropy difference) on the inputs' own ids, real tokens only."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: its positions do not count
    x = ExampleInputs((), {"input_ids": ids, "attention_mask": mask})
    ref, new = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    new[1, 4:] += 100 * torch.randn(2, 11, generator=g)  # a wild prediction at a padded position
    q = task_quality([(summarize({"logits": new}, x), summarize({"logits": ref}, x))])

    def mean_nll(logits):
        rows = [(b, t) for b in range(2) for t in range(5) if mask[b, t] and mask[b, t + 1]]
        return sum(float(-logits[b, t].log_softmax(-1)[ids[b, t + 1]]) for b, t in rows) / len(rows)

    assert q.extra["ppl ratio"] == pytest.approx(math.exp(mean_nll(new) - mean_nll(ref)), rel=1e-5)
    same = task_quality([(summarize({"logits": ref}, x), summarize({"logits": ref}, x))])
    assert same.extra["ppl ratio"] == pytest.approx(1.0)


def test_a_classifier_row_gives_top5_agreement():
    ref = torch.zeros(4, 10)
    ref[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 10  # the original's classes: 0, 1, 2, 3
    new = torch.arange(10.0).repeat(4, 1)  # the new model's top five: 9..5 for every sample
    new[0, 0], new[1, 1] = 100, 6.5  # sample 0: the same top-1; sample 1: class 1 is fourth
    x = ExampleInputs((torch.zeros(4, 3),), {})
    q = task_quality([(summarize({"logits": new}, x), summarize({"logits": ref}, x))])
    assert (q.name, q.value, q.extra) == ("top-1 agreement", 0.25, {"top-5": 0.5})


def test_interleaved_timings_alternate_the_order_and_keep_each_callables_median():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")

    medians = interleaved_medians([slow, fast], repeat=4, warmup=1)
    assert calls == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    assert medians[0] > 0.003 > medians[1]  # in the order the callables were given, whatever order they ran in
