"""Triton kernels for quantized layers, under the interpreter (tests/conftest.py turns it on): each against its
reference on odd shapes."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from graphopt.kernels import quant_triton  # noqa: E402
from graphopt.kernels.quant import dynamic_quantize_uint8, pack, quant_linear_reference  # noqa: E402
from graphopt.kernels.quant_triton import TileConfig, int8_matmul, weight_only_matmul  # noqa: E402
from graphopt.nn.quant import QuantLinear, quantize_weight  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

K, N = 200, 72  # K not a multiple of any block or group; N not a multiple of the tiles (32 / 64)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _packed(scheme, group, k=K, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scale = quantize_weight(torch.randn(n, k, generator=g), scheme, group)
    return pack(codes, scheme), scale


def _rel(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("group", [0, 32, 64, 128, 48, 8])  # 48: a 16-wide tile; 8: dequantized per tile
@pytest.mark.parametrize("scheme", ["int8", "int4", "ternary"])
def test_weight_only_kernel_matches_reference(scheme, group, m, dtype):
    qweight, scale = _packed(scheme, group)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = scale.to(dtype)
    got = weight_only_matmul(x, qweight, scale, scheme, group, K)
    want = quant_linear_reference(x.float(), qweight, scale.float(), scheme, group, K)
    assert got.dtype == dtype and got.shape == (m, N)
    assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("scheme, group", [("int4", 32), ("ternary", 0), ("int8", 128)])
def test_split_k_and_gemm_tiles_give_the_same_result(scheme, group):
    qweight, scale = _packed(scheme, group, k=520)
    x = torch.randn(5, 3, 520, generator=torch.Generator().manual_seed(2))
    want = quant_linear_reference(x, qweight, scale, scheme, group, 520)
    configs = [TileConfig(16, 32, 128, split_k=1), TileConfig(16, 32, 128, split_k=3), TileConfig(16, 16, 64, 9),
               TileConfig(32, 64, 32)]
    results = [weight_only_matmul(x, qweight, scale, scheme, group, 520, config=c) for c in configs]
    for got in results:
        assert got.shape == (5, 3, N) and _rel(got, want) < 1e-5
    again = weight_only_matmul(x, qweight, scale, scheme, group, 520, config=configs[1])
    assert torch.equal(again, results[1])  # split-K partials are summed, not raced: deterministic


def test_default_config_splits_k_for_small_m_only():
    cpu = torch.device("cpu")
    small, large = quant_triton.weight_only_config(1, 64, 4096, 128, cpu), quant_triton.weight_only_config(
        4096, 64, 4096, 128, cpu)
    assert small.split_k > 1 and small.block_m == 16
    assert large.split_k == 1 and 128 % large.block_k == 0  # K tiles inside one group: scales after the dot


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_gemm_per_token_matches_its_reference(m, dtype):
    qweight, scale = _packed("int8", 0)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, m)[:, None]
    a_scale = x.abs().amax(1).clamp_min(1e-8) / 127
    codes = torch.round(x / a_scale[:, None]).clamp(-127, 127)
    got = int8_matmul(codes.to(torch.int8), qweight, a_scale, torch.zeros(m, dtype=torch.int32), scale[:, 0].to(dtype),
                      dtype)
    want = (codes @ qweight.float().T) * a_scale[:, None] * scale[:, 0]
    assert got.dtype == dtype and _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_gemm_with_zero_points_matches_the_w8a8_reference(m):
    """Per-tensor uint8 codes with a zero point, as the torch reference and onnxruntime quantize."""
    qweight, scale = _packed("int8", 0)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(4)) + 0.7  # a zero point far from 128
    q, x_scale, zero = dynamic_quantize_uint8(x)
    offset = (128 - zero).to(torch.int32).expand(m)
    got = int8_matmul((q - 128).to(torch.int8), qweight, x_scale.expand(m), offset, scale[:, 0], torch.float32)
    want = quant_linear_reference(x, qweight, scale, "int8", 0, K, activations="per_tensor")
    assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("scheme, group, activations, backends", [
    ("int8", 0, "none", ["torch", "int8_mm", "triton"]),
    ("int4", 32, "none", ["torch", "triton"]),
    ("int4", 0, "none", ["torch", "triton"]),
    ("ternary", 16, "none", ["torch", "triton"]),
    ("int8", 0, "per_tensor", ["torch", "triton"]),
    ("int8", 0, "per_token", ["torch", "triton"]),
])
def test_quant_linear_gives_the_same_output_on_every_backend(scheme, group, activations, backends):
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    x = torch.randn(2, 9, K)
    outputs = []
    for backend in backends:
        layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme=scheme, group_size=group, backend=backend,
                                        activations=activations)
        with torch.no_grad():
            outputs.append(layer(x))
    for got in outputs[1:]:
        assert _rel(got, outputs[0]) < 1e-5


def test_auto_backend_is_the_reference_on_cpu():
    layer = QuantLinear.from_linear(torch.randn(N, K), None, scheme="int4", group_size=32)
    assert layer.backend == "auto" and layer.resolved_backend(torch.randn(1, K)) == "torch"


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    layer = QuantLinear.from_linear(torch.randn(N, K), None, scheme="int4", group_size=32, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='torch'"):
        layer(torch.randn(1, K))


def test_kernels_refuse_float64_activations():
    qweight, scale = _packed("int4", 32)
    with pytest.raises(TypeError, match="float16 / bfloat16 / float32"):
        weight_only_matmul(torch.ones(1, K, dtype=torch.float64), qweight, scale, "int4", 32, K)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = QuantLinear.from_linear(torch.randn(64, K), torch.randn(64), scheme="int4", group_size=32,
                                          backend="triton")
        self.down = QuantLinear.from_linear(torch.randn(N, 64), None, scheme="ternary", group_size=0, backend="triton")

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_quantized_model_exports_with_the_custom_op_in_the_graph():
    model, x = _Mlp().eval(), torch.randn(3, K)
    program = torch.export.export(model, (x,))
    calls = [n for n in program.graph.nodes if n.target is torch.ops.graphopt.quant_linear.default]
    assert len(calls) == 2 and all("triton" in n.args for n in calls)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_torch_compile_traces_through_the_custom_op_without_graph_breaks():
    model, x = _Mlp().eval(), torch.randn(3, K)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_hf_llama_runs_and_generates_on_the_triton_backend():
    import graphopt as go
    from graphopt.helpers.zoo import hf_model

    model, example = hf_model("llama_causal_lm")
    quantized = go.optimize(model, example, "quantize(scheme=int4,group_size=16)", measure=False).model
    ids = example["input_ids"][:1, :6]
    with torch.no_grad():
        reference = quantized(input_ids=ids).logits
        for layer in quantized.modules():
            if isinstance(layer, QuantLinear):
                layer.backend = "triton"
        assert _rel(quantized(input_ids=ids).logits, reference) < 1e-4
        out = quantized.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


def test_gpu_benchmark_script_runs_its_dry_run(capsys):
    """benchmarks/kernels_gpu.py end to end on tiny shapes under the interpreter (what a GPU run will do)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"
    spec = importlib.util.spec_from_file_location("kernels_gpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "--m", "1,17", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    for label in script.FORMATS:
        assert f"| {label} " in out
    errors = [float(line.split("|")[-2]) for line in out.splitlines() if line.startswith("| 96x160") and "e-" in line]
    assert len(errors) == 2 * len(script.FORMATS) and max(errors) < 1e-5
    assert "graphopt int4 g128 (triton)" in out and "tokens/s" in out


def test_kernels_compile_for_real_gpus_without_one():
    """The interpreter does not check what only the compiler does (layouts, dot shapes, dtypes): compile a
    variant of each path to sm_80 and sm_90 cubin with Triton's bundled ptxas (no GPU needed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for arch in ("80", "90"):
        proc = subprocess.run([sys.executable, str(script), "--compile-only", arch, "--quick"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"sm_{arch}: 5 of 5 kernel variants compiled to cubin, 0 failed" in proc.stdout
