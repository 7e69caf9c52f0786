"""The ``graphopt`` command: ``passes``, ``optimize``, ``inspect``, exit codes and error lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.cli import DEFAULT_CALIB_SIZE, main
from graphopt.data import stdlib_texts
from graphopt.infra import registry

FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.drop = nn.Dropout(0.2)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = self.drop(torch.relu(self.bn(self.conv(x))))
            return self.head(y.mean((2, 3)))

    def make():
        torch.manual_seed(0)
        model = ConvNet()
        with torch.no_grad():  # non-trivial statistics, so folding BN really changes the weights
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
            model.bn.weight.uniform_(0.5, 1.5)
        return model, torch.randn(2, 3, 8, 8)

    def make_model_only():
        return nn.Linear(2, 2)

    def make_wrong():
        return "not a model"
''')


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("graphopt: error:")]


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "cli_models.py"
    path.write_text(FACTORY_SOURCE)
    return path


@pytest.fixture
def factory_module(factory_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(factory_file.parent))
    monkeypatch.delitem(sys.modules, "cli_models", raising=False)
    return "cli_models"


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes registered by a test disappear after it."""
    go.list_passes()  # built-in passes first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


# --- graphopt passes -------------------------------------------------------------------------------

def test_passes_lists_every_pass_with_options_and_presets(capsys):
    code, out, err = run_cli(capsys, "passes")
    assert code == 0 and not error_lines(err)
    for name, cls in go.list_passes().items():
        assert f"{name}  [" in out
        assert cls.doc() in out
    assert "remove_dropout  [tolerance 1e-05]" in out
    assert "      where: str = *" in out  # remove_dropout's option with type and default
    for name, text in go.list_presets().items():
        assert re.search(rf"^  {name} += {re.escape(text)}$", out, re.M), name
    assert "default" in go.list_presets()


def test_installed_script_runs_without_stdin_and_fails_with_one_line(tmp_path):
    script = shutil.which("graphopt", path=os.path.dirname(sys.executable))
    assert script, "the graphopt console script is not installed next to this interpreter"
    env = {**os.environ, "CI": "true"}
    ok = subprocess.run([script, "passes"], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "remove_dropout  [" in ok.stdout and "where: str = *" in ok.stdout
    bad = subprocess.run([script, "optimize", "minilm", "--pipeline", "remove_dropot,fold_bn"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "graphopt: error: bad pipeline: unknown pass 'remove_dropot'; did you mean 'remove_dropout'?"]
    assert "Traceback" not in bad.stderr


# --- graphopt optimize -----------------------------------------------------------------------------

def test_optimize_minilm_writes_model_and_report(capsys, tmp_path):
    from transformers import AutoModel

    from graphopt.models import load_model_spec

    out_dir, report_file = tmp_path / "minilm-opt", tmp_path / "report.json"
    code, out, err = run_cli(capsys, "optimize", "minilm", "--pipeline", "remove_dropout", "--out", str(out_dir),
                             "--json", str(report_file), "--no-measure")
    assert code == 0, err
    assert "model: all-MiniLM-L6-v2 (BertModel" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("original", "remove_"))}
    assert rows["remove_dropout"][1] == "ok"

    model, inputs, tokenizer, _ = load_model_spec("minilm")
    n_dropout = sum(isinstance(m, nn.Dropout) for m in model.modules())
    report = json.loads(report_file.read_text())
    assert report["pipeline"] == "remove_dropout"
    record = report["records"][1]
    assert record["status"] == "ok" and record["stats"]["removed"] == n_dropout > 0
    assert record["max_rel_err"] == 0.0

    # the config still describes the model (eval-mode Dropout is the identity): plain transformers reloads it
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    reloaded = AutoModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        err_vs_original = go.compare_outputs(reloaded(**inputs), model(**inputs))
    assert err_vs_original.max_abs == 0.0


def test_unknown_pass_exits_2_with_suggestion_before_loading(capsys):
    code, out, err = run_cli(capsys, "optimize", "no/such/model", "--pipeline", "fold_bn,remove_dropot")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "graphopt: error: bad pipeline: unknown pass 'remove_dropot'; did you mean 'remove_dropout'?"]


def test_unknown_option_exits_2_with_suggestion(capsys, factory_module):
    code, _, err = run_cli(capsys, "optimize", f"{factory_module}:make", "--pipeline", "remove_dropout(wher='*')")
    assert code == 2
    assert error_lines(err) == ["graphopt: error: bad pipeline: remove_dropout has no option 'wher'; "
                                "did you mean 'where'?"]


@pytest.mark.parametrize("spec, reason", [
    ("{tmp}/missing", "no such directory: {tmp}/missing"),
    ("{tmp}", "{tmp} has no config.json"),
    ("missing_module_xyz:make", "no module named 'missing_module_xyz'"),
    ("{tmp}/nofile.py:make", "no such file: {tmp}/nofile.py"),
    ("not-a-model", "unknown model spec 'not-a-model'"),
])
def test_bad_model_spec_exits_2_with_one_line(capsys, tmp_path, spec, reason):
    spec, reason = spec.format(tmp=tmp_path), reason.format(tmp=tmp_path)
    code, out, err = run_cli(capsys, "optimize", spec)
    assert code == 2 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1 and reason in lines[0], err
    assert "Traceback" not in err


def test_factory_returning_wrong_type_exits_2(capsys, factory_module):
    code, _, err = run_cli(capsys, "optimize", f"{factory_module}:make_wrong", "-q")
    assert code == 2
    assert error_lines(err) == [f"graphopt: error: factory {factory_module}:make_wrong returned a str, "
                                "expected nn.Module or (model, example_inputs)"]
    code, _, err = run_cli(capsys, "optimize", f"{factory_module}:make_model_only", "-q")
    assert code == 2 and "return (model, example_inputs) instead" in error_lines(err)[0]


def test_factory_model_is_optimized_with_default_pipeline(capsys, factory_module, tmp_path):
    report_file = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "optimize", f"{factory_module}:make", "--json", str(report_file), "-q")
    assert code == 0, err
    assert "pipeline: remove_dropout,fold_bn" in out
    records = {r["name"]: r for r in json.loads(report_file.read_text())["records"]}
    assert records["remove_dropout"]["stats"]["removed"] == 1
    assert records["fold_bn"]["status"] == "ok" and records["fold_bn"]["stats"]["folded"] == 1
    assert records["fold_bn"]["max_rel_err"] < 1e-5
    assert records["fold_bn"]["params"] < records["original"]["params"]  # BN's 16 parameters are gone


def test_factory_file_spec_and_onnx_export(capsys, factory_file, tmp_path):
    onnx_file = tmp_path / "convnet.onnx"
    code, out, err = run_cli(capsys, "optimize", f"{factory_file}:make", "--onnx", str(onnx_file), "-q",
                             "--no-measure")
    assert code == 0, err
    assert onnx_file.is_file() and onnx_file.stat().st_size > 0
    assert f"wrote {onnx_file}" in out and "(opset 23," in out

    older = tmp_path / "convnet18.onnx"
    code, out, err = run_cli(capsys, "optimize", f"{factory_file}:make", "--onnx", str(older), "--onnx-opset", "18",
                             "-q", "--no-measure")
    assert code == 0, err
    assert f"wrote {older} (opset 18," in out


def test_rolled_back_pass_exits_1_and_still_reports(capsys, factory_module, scratch_registry):
    @go.register_pass("cli_test_explodes")
    def explodes(program, am):
        """Always fails."""
        raise RuntimeError("boom")

    code, out, err = run_cli(capsys, "optimize", f"{factory_module}:make", "--pipeline",
                             "remove_dropout,cli_test_explodes", "-q", "--no-measure")
    assert code == 1
    assert "cli_test_explodes  rolled back" in out and "RuntimeError: boom" in out
    assert "graphopt: 1 pass(es) rolled back: cli_test_explodes (see the report)" in err


# --- calibration ------------------------------------------------------------------------------------

@pytest.fixture
def calib_probe(scratch_registry) -> dict:
    """A pass that needs calibration and records what it got."""
    seen: dict = {}

    @go.register_pass("cli_test_probe", needs_calibration=True)
    def probe(program, am):
        """Records the calibration batches."""
        batches = list(program.calib)
        seen["batches"] = batches
        result = go.PassResult(modified=False)
        result.stats = {"batches": len(batches), "samples": sum(b["input_ids"].shape[0] for b in batches)}
        return result

    return seen


def test_calib_docstrings_reaches_passes_as_token_batches(capsys, text_model_dir, calib_probe):
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "cli_test_probe",
                             "--calib", "docstrings", "--calib-size", "10", "--batch-size", "4",
                             "--max-length", "24", "-q", "--no-measure")
    assert code == 0, err
    batches = calib_probe["batches"]
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["input_ids"].shape[1] <= 24 for b in batches)
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert "calibration: 10 samples in 3 batches from docstrings" in out


def test_calib_defaults_to_docstrings_when_a_pass_needs_it(capsys, text_model_dir, calib_probe):
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "cli_test_probe", "-q",
                             "--no-measure")
    assert code == 0, err
    # the whole calibration split of the docstrings (fewer texts than the cap)
    n = len(stdlib_texts(split="calib"))
    assert n <= DEFAULT_CALIB_SIZE and sum(b["input_ids"].shape[0] for b in calib_probe["batches"]) == n


def test_calib_file_gives_one_sample_per_line(capsys, text_model_dir, calib_probe, tmp_path):
    texts = tmp_path / "calib.txt"
    texts.write_text("The first sample.\n\nA second, longer sample of text.\nThird.\n")
    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "cli_test_probe",
                           "--calib", str(texts), "--calib-size", "2", "-q", "--no-measure")
    assert code == 0, err
    assert sum(b["input_ids"].shape[0] for b in calib_probe["batches"]) == 2
    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "cli_test_probe",
                           "--calib", str(texts), "-q", "--no-measure")  # fewer lines than the default size
    assert code == 0, err
    assert sum(b["input_ids"].shape[0] for b in calib_probe["batches"]) == 3
    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "cli_test_probe",
                           "--calib", str(texts), "--calib-size", "4", "-q")
    assert code == 2 and error_lines(err) == [f"graphopt: error: {texts} has 3 texts, 4 were asked for; "
                                              "ask for at most 3"]
    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--calib", str(tmp_path / "none.txt"))
    assert code == 2 and "--calib" in error_lines(err)[0] and "no such file" in error_lines(err)[0]


def test_calib_without_tokenizer_exits_2(capsys, factory_module, calib_probe):
    code, _, err = run_cli(capsys, "optimize", f"{factory_module}:make", "--pipeline", "cli_test_probe", "-q")
    assert code == 2
    assert "needs calibration data" in error_lines(err)[0] and "has no tokenizer" in error_lines(err)[0]


# --- graphopt inspect -------------------------------------------------------------------------------

def test_inspect_prints_graph_summary(capsys, factory_module):
    code, out, err = run_cli(capsys, "inspect", f"{factory_module}:make")
    assert code == 0, err
    assert "ConvNet" in out
    assert "aten.conv2d" in out and "batch_norm" in out and "aten.linear" in out
    assert "float32[2, 3, 8, 8]" in out  # the input with its shape
    assert "float32[2, 4]" in out  # the output


def test_inspect_bad_spec_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2 and error_lines(err) == [f"graphopt: error: no such directory: {tmp_path / 'missing'}"]


def test_hf_directory_out_is_a_directory_plain_transformers_loads(capsys, text_model_dir, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "prune(ratio=0.5,reloadable=true)",
                             "--out", str(out_dir), "-q", "--no-measure")
    assert code == 0, err
    assert "from_pretrained" in out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    script = ("import sys, torch, transformers; d = sys.argv[1]; "
              "m = transformers.AutoModel.from_pretrained(d).eval(); t = transformers.AutoTokenizer.from_pretrained(d); "
              "x = t(['a short sentence'], return_tensors='pt'); m(**x); "
              "print(m.config.intermediate_size, 'graphopt' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(out_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["32", "False"]


def test_hf_directory_out_falls_back_to_graphopt_format_and_says_why(capsys, text_model_dir, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "prune(ratio=0.5)",
                             "--out", str(out_dir), "-q", "--no-measure")
    assert code == 0, err
    assert "graphopt.load" in out and "not as a transformers directory" in out
    assert (out_dir / "graphopt.json").exists() and not (out_dir / "config.json").exists()


def test_option_out_of_range_exits_2_before_loading(capsys):
    code, _, err = run_cli(capsys, "optimize", "minilm", "--pipeline", "prune(ratio=1.5)")
    assert code == 2 and "prune(ratio=...): 1.5 is out of range; it must be in [0, 1)" in err


def test_plots_of_the_report_and_of_the_groups_are_written(capsys, text_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    report_png, groups_png = tmp_path / "report.png", tmp_path / "groups.png"
    code, out, _ = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "prune(ratio=0.3)",
                           "--plot", str(report_png), "--eval-size", "8", "-q")
    assert code == 0 and report_png.stat().st_size > 10_000 and f"report drawn to {report_png}" in out
    assert "summary: params" in out and "sentence-embedding cosine" in out and "on 8 held-out samples" in out
    code, out, _ = run_cli(capsys, "inspect", str(text_model_dir), "--plot", str(groups_png), "-q")
    assert code == 0 and groups_png.stat().st_size > 10_000


def test_progress_lines_reach_a_log_that_is_not_a_terminal(capsys, text_model_dir, monkeypatch):
    """A CI log or a file shows what runs: a line per pass, and long work's lines with elapsed time and an
    estimate of what remains (every GRAPHOPT_PROGRESS_EVERY seconds; 0 here, so every step writes one)."""
    import graphopt.progress

    monkeypatch.setattr(graphopt.progress, "EVERY", 0.0)
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "prune(ratio=0.5),heal(steps=3)",
                             "--calib", "docstrings", "--calib-size", "16", "--eval-size", "0", "--no-measure")
    assert code == 0, err
    lines = err.splitlines()
    assert "optimizing (2 passes) ..." in lines
    for i, text in ((1, r"prune\(ratio=0\.5\S*"), (2, r"heal\S*")):
        assert any(re.search(rf"\] pass {i}/2: {text} \.\.\.$", line) for line in lines), err
        assert any(re.search(rf"\] pass {i}/2: {text} ok in [\d.]+ s$", line) for line in lines), err
    steps = [line for line in lines if re.search(r"\] heal: \d/3 steps", line)]
    assert len(steps) == 3 and all("elapsed" in s for s in steps) and "left" in steps[0], err
    assert any(re.search(r"\] heal: 3 steps in \d+ s", line) for line in lines), err

    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "prune(ratio=0.5)", "-q",
                           "--no-measure")
    assert code == 0 and "pass 1/1" not in err and "optimizing" not in err


def test_one_pass_is_one_pass(capsys, text_model_dir):
    code, _, err = run_cli(capsys, "optimize", str(text_model_dir), "--pipeline", "remove_dropout", "--no-measure")
    assert code == 0 and "optimizing (1 pass) ..." in err.splitlines()


def test_passes_lists_help_for_every_option_of_every_built_in_pass(capsys):
    import dataclasses

    from graphopt.infra.options import option_help

    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    built_in = {name: cls for name, cls in go.list_passes().items() if cls.__module__.startswith("graphopt.passes")}
    assert len(built_in) >= 9
    for name, cls in built_in.items():
        helps = option_help(cls)
        options = [f.name for f in dataclasses.fields(cls) if f.init]
        assert not set(options) - set(helps), f"{name}: options without help: {set(options) - set(helps)}"
        for option in options:  # the help is printed on the option's own line
            assert any(line.strip().startswith(f"{option}:") and line.rstrip().endswith(helps[option])
                       for line in out.splitlines()), (name, option)
    assert re.search(r"ratio: float in \[0, 1\) = 0\.3 +fraction of units removed", out)
    assert "reloadable: bool = false" in out and "uniform: bool" not in out  # one option per name


def test_a_model_without_text_brings_its_own_calibration_and_held_out_views(capsys, scratch_registry):
    """effnet-lite0: calibration views of the calibration photos, and the quality figure (top-1 and top-5
    agreement) on views of the other photos."""
    seen: dict = {}

    @go.register_pass("cli_test_views", needs_calibration=True)
    def views(program, am):
        """Records the calibration batches."""
        seen["batches"] = program.calib_batches()
        return go.PassResult(modified=False)

    code, out, err = run_cli(capsys, "optimize", "effnet-lite0", "--pipeline", "cli_test_views,fold_bn",
                             "--calib-size", "6", "--batch-size", "4", "--eval-size", "5")
    assert code == 0, err
    assert [tuple(b.shape) for b in seen["batches"]] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert "quality: top-1 agreement against the original, on 5 held-out samples" in out
    row = next(line for line in out.splitlines() if line.startswith("fold_bn "))
    assert row.split()[-2:] == ["1.0000", "1"]  # quality and top-5: folding BatchNorm is exact


def test_stream_writes_what_the_in_memory_run_gives(capsys, tmp_path):
    from graphopt.helpers.models import example_inputs_for
    from graphopt.helpers.zoo import hf_model

    model, _ = hf_model("llama_causal_lm", layers=3)
    model.save_pretrained(tmp_path / "src")
    code, out, err = run_cli(capsys, "optimize", str(tmp_path / "src"), "--stream", "-p", "quantize(scheme=int8)",
                             "--out", str(tmp_path / "out"))
    assert code == 0 and not error_lines(err)
    assert "streamed quantize(scheme=int8,method=rtn) over 3 blocks" in out
    with torch.device("meta"):
        base = type(model)(model.config)
    loaded = go.load(tmp_path / "out", base)
    want = go.optimize(model, example_inputs_for(model), "quantize(scheme=int8)", measure=False).model
    assert want.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("argv, message", [
    (["-p", "prune(ratio=0.2)", "--out", "OUT", "--memory-limit", "0"], "prune works on the whole model"),
    (["-p", "prune(ratio=0.2)", "--out", "OUT", "--memory-limit", "0"], "nor run it on the whole model in memory"),
    (["-p", "quantize(scheme=int8)"], "give --out DIR"),
    (["-p", "quantize(scheme=int8)", "--out", "OUT", "--onnx", "m.onnx"], "drop --onnx"),
])
def test_stream_refusals_exit_2_before_writing(capsys, tmp_path, argv, message):
    from graphopt.helpers.zoo import hf_model

    hf_model("llama", layers=2)[0].save_pretrained(tmp_path / "src")
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code, _, err = run_cli(capsys, "optimize", str(tmp_path / "src"), "--stream", *argv)
    assert code == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_memory_limit_without_stream_is_refused(capsys, tmp_path):
    from graphopt.helpers.zoo import hf_model

    hf_model("llama", layers=2)[0].save_pretrained(tmp_path / "src")
    code, _, err = run_cli(capsys, "optimize", str(tmp_path / "src"), "-p", "quantize(scheme=int8)",
                           "--memory-limit", "4")
    assert code == 2 and "give --stream too" in err
