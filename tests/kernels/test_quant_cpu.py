"""The CPU paths of quantized layers (``int_mm``, ``int8_mm``) and ``backend="auto"``'s measured choice: each path
against the reference on odd shapes, the choice against its own table, compile and export through the layers."""

import json

import pytest
import torch
from torch import nn

from graphopt.kernels import quant, quant_dispatch
from graphopt.kernels.quant import pack, quant_linear_impl, quant_linear_reference
from graphopt.kernels.quant_cpu import _int8_digits, runs_on
from graphopt.nn.quant import QuantLinear, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

K, N = 200, 72  # odd sizes: no block or vector width divides them


def _packed(k=K, n=N, qmax=None, seed=0):
    codes, scale = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), "int8", 0, qmax)
    return pack(codes, "int8"), scale


def _rel(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture
def fresh_table(tmp_path, monkeypatch):
    """An empty table of measured paths in a temporary cache directory."""
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(quant_dispatch, "_table", None)
    monkeypatch.setattr(quant_dispatch, "_chosen", {})
    monkeypatch.setattr(quant_dispatch, "_last_pick", {})
    return tmp_path / "quant_backends.json"


INTEGER_BACKENDS = ["int_mm", "onednn"]


@pytest.mark.parametrize("backend", INTEGER_BACKENDS)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("activations", ["per_tensor", "per_token"])
def test_integer_gemms_w8a8_equal_the_reference(m, activations, backend):
    qweight, scale = _packed(qmax=63)
    x = torch.randn(3, m, K, generator=torch.Generator().manual_seed(1)) + 0.7  # per tensor: zero point far from 128
    got = quant_linear_impl(x, qweight, scale, "int8", 0, K, activations, backend)
    want = quant_linear_reference(x, qweight, scale, "int8", 0, K, activations)
    assert got.shape == (3, m, N)
    assert _rel(got, want) < 1e-6  # the same integers, scaled once: float rounding only


@pytest.mark.parametrize("backend", INTEGER_BACKENDS)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_gemms_weight_only_match_float_rounding(m, dtype, backend):
    """Weight-only int8 from an integer GEMM: as close to the exact product as a float32 matmul is."""
    qweight, scale = _packed()
    x = (torch.randn(m, K, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 2, K)).to(dtype)
    exact = x.double() @ (qweight.double() * scale.double()).T
    got = quant_linear_impl(x, qweight, scale.to(dtype), "int8", 0, K, "none", backend)
    fp32 = quant_linear_reference(x.float(), qweight, scale, "int8", 0, K)
    assert got.dtype == dtype
    assert _rel(got, exact) < (3e-6 if dtype == torch.float32 else 8e-3)
    assert _rel(fp32, exact) < 3e-6


def test_int8_digits_sum_to_the_input():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * torch.logspace(-4, 3, 300)
    x[2] = 0  # an all-zero row
    digits, scales = _int8_digits(x)
    assert digits.dtype == torch.int8 and digits.shape == (15, 300)
    rebuilt = (digits.double() * scales.double()).reshape(3, 5, 300).sum(0)
    bound = x.abs().amax(-1, keepdim=True).double() * 2**-23  # float32 rounding of the row's largest element
    assert bool(((rebuilt - x.double()).abs() <= bound).all())
    assert bool((rebuilt[2] == 0).all())


@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_mm_equals_the_reference(m):
    qweight, scale = _packed()
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(4))
    got = quant_linear_impl(x, qweight, scale, "int8", 0, K, "none", "int8_mm")
    assert _rel(got, quant_linear_reference(x, qweight, scale, "int8", 0, K)) < 1e-5


def test_onednn_packs_codes_again_when_they_change_in_place():
    """oneDNN's reordered copy of the codes lives beside the layer; loading other codes into the same buffer
    (what ``load_state_dict`` does) must not leave the old copy in use."""
    lin, other = nn.Linear(K, N), nn.Linear(K, N)
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations="per_token",
                                    backend="onednn")
    second = QuantLinear.from_linear(other.weight, other.bias, scheme="int8", group_size=0, activations="per_token",
                                     backend="torch")
    x = torch.randn(4, K)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(second.state_dict())
        after = layer(x)
        want = second(x)
    assert _rel(after, want) < 1e-6 and _rel(before, want) > 0.1


@pytest.mark.parametrize("activations", ["none", "per_tensor", "per_token"])
def test_onednn_gets_uint8_activations(activations):
    """oneDNN's int8 linear runs its fast kernels for uint8 activations only: given int8 it falls back to a
    reference kernel (measured 700x slower at 3 x 576 x 1536), so every scheme must reach it as uint8."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.onednn.qlinear_pointwise.default:
                seen.append((args[0].dtype, args[2]))
            return func(*args, **(kwargs or {}))

    qweight, scale = _packed()
    x = torch.randn(7, K)
    with Record():
        got = quant_linear_impl(x, qweight, scale, "int8", 0, K, activations, "onednn")
    assert seen == [(torch.uint8, 128)]
    assert _rel(got, quant_linear_impl(x, qweight, scale, "int8", 0, K, activations, "int_mm")) < 1e-6


def test_a_forced_backend_that_cannot_run_says_what_to_use():
    lin = nn.Linear(K, N)
    with pytest.raises(ValueError, match="int_mm.*int8 weights.*use backend='auto'"):
        QuantLinear.from_linear(lin.weight, lin.bias, scheme="int4", group_size=32, backend="int_mm")
    with pytest.raises(ValueError, match="int8_mm.*weight-only.*'int_mm' for w8a8"):
        QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, backend="int8_mm",
                                activations="per_token")
    assert "runs on CPU tensors" in runs_on("int_mm", torch.empty(1, device="meta"))
    assert runs_on("int_mm", torch.empty(1)) is None


def test_auto_picks_the_fastest_path_of_its_own_table(fresh_table):
    torch.manual_seed(0)
    lin = nn.Linear(384, 1536)
    layers = {(scheme, acts): QuantLinear.from_linear(lin.weight, lin.bias, scheme=scheme, group_size=group,
                                                      activations=acts)
              for scheme, group, acts in [("int8", 0, "per_token"), ("int8", 0, "none"), ("int4", 32, "none")]}
    x = torch.randn(1, 20, 384)
    with torch.no_grad():
        picks = {k: layer.resolved_backend(x) for k, layer in layers.items()}
        for layer in layers.values():
            layer(x)
    entries = json.loads(fresh_table.read_text())
    assert len(entries) == 2  # int4 groups have no CPU path but the reference: nothing to time
    assert picks[("int4", "none")] == "torch"
    for key, entry in entries.items():
        ms = entry["ms"]
        assert entry["best"] == min(ms, key=ms.get) and ms[entry["best"]] <= ms["torch"]
        assert json.loads(key)[7] == 32  # 20 rows, timed as the next power of two
    per_token = next(e for k, e in entries.items() if "per_token" in k)
    assert set(per_token["ms"]) == {"torch", "int_mm", "onednn"}
    assert picks[("int8", "per_token")] == per_token["best"]
    weight_only = next(e for k, e in entries.items() if "per_token" not in k)
    assert set(weight_only["ms"]) == {"torch", "int_mm", "onednn", "int8_mm"}
    # a table on disk is read back, not measured again
    quant_dispatch._table, quant_dispatch._chosen = None, {}
    assert quant_dispatch.table().entries == entries


def test_a_planted_table_entry_decides_auto(fresh_table):
    """What auto runs is the table's pick: plant one, and the layer runs it."""
    lin = nn.Linear(K, N)
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0, activations="per_token")
    x = torch.randn(4, K)
    key = quant_dispatch.table_key(x, "int8", 0, "per_token", K, N)
    quant_dispatch.table().entries[key] = {"ms": {"torch": 2.0, "int_mm": 1.0}, "best": "int_mm"}
    assert layer.resolved_backend(x) == "int_mm"
    quant_dispatch.table().entries[key] = {"ms": {"torch": 1.0, "int_mm": 2.0}, "best": "torch"}
    quant_dispatch._chosen.clear()
    assert layer.resolved_backend(x) == "torch"


def _w8a8_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, 96), nn.GELU(), nn.Linear(96, N)).eval()
    for i in (0, 2):
        lin = model[i]
        model[i] = QuantLinear.from_linear(lin.weight, lin.bias, scheme="int8", group_size=0,
                                           activations="per_token", backend="int_mm")
    return model


@pytest.mark.parametrize("backend", INTEGER_BACKENDS)
def test_compile_fullgraph_traces_through_the_integer_paths(backend):
    model = _w8a8_model()
    for layer in (model[0], model[2]):
        layer.backend = backend
    x = torch.randn(5, K)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert _rel(got, want) < 1e-5


def test_auto_layers_compile_in_one_graph_and_export_with_their_eager_picks(fresh_table):
    """After an eager call has picked the paths, ``torch.compile(fullgraph=True)`` traces ``auto`` layers
    without a graph break, and an exported graph names the eager pick (planted in the table here)."""
    model = _w8a8_model()
    for layer in (model[0], model[2]):
        layer.backend = "auto"
    x = torch.randn(5, K)
    with torch.no_grad():
        model(x)
        for key in quant_dispatch.table().entries:
            quant_dispatch.table().entries[key] = {"ms": {"torch": 2.0, "int_mm": 1.0, "onednn": 3.0},
                                                   "best": "int_mm"}
        quant_dispatch._chosen.clear()
        want = model(x)
        assert _rel(torch.compile(model, fullgraph=True)(x), want) < 1e-5
    program = torch.export.export(model, (x,))
    calls = [n for n in program.graph.nodes if n.target == torch.ops.graphopt.quant_linear.default]
    assert [n.args[-1] for n in calls] == ["int_mm", "int_mm"]


def test_export_keeps_one_op_per_layer_with_its_backend():
    model = _w8a8_model()
    x = torch.randn(5, K)
    program = torch.export.export(model, (x,))
    calls = [n for n in program.graph.nodes if n.target == torch.ops.graphopt.quant_linear.default]
    assert len(calls) == 2 and all(n.args[-1] == "int_mm" for n in calls)
    assert not any(n.target == torch.ops.aten._int_mm.default for n in program.graph.nodes)
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


def test_eager_layers_skip_the_op_but_flop_counting_and_gradients_see_it():
    from torch.utils.flop_counter import FlopCounterMode

    model = _w8a8_model()
    x = torch.randn(5, K)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    assert counter.get_total_flops() == 2 * 5 * (K * 96 + 96 * N)
    layer = model[0]
    x.requires_grad_(True)
    layer(x).sum().backward()  # the op's straight-through backward: the gradient of x @ W.T, W dequantized
    assert torch.allclose(x.grad, torch.ones(5, 96) @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 40), ("int4", 0), ("ternary", 40), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_one_row_weight_only_layers_reduce_over_the_packed_codes(fresh_table, scheme, group, rows):
    """Under torch.compile a weight-only layer given one row (decoding) is traced as one reduction over its
    packed codes, whatever ``auto`` picked eagerly; more rows, or groups that do not divide the input (64
    into 200), keep the reference's matmul. Both equal the reference."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # a graph per case of QuantLinear.forward: more than dynamo's recompile limit
    lin = nn.Linear(K, N)
    layer = QuantLinear.from_linear(lin.weight, lin.bias, scheme=scheme, group_size=group)
    x = torch.randn(1, rows, K)
    with torch.no_grad():
        want = quant_linear_reference(x, layer.qweight, layer.scale, scheme, group, K) + layer.bias
        layer(x)  # auto's eager pick first
        got = torch.compile(layer, backend=record, fullgraph=True)(x)
    assert _rel(got, want) < 1e-5
    matmuls = [n for g in graphs for n in g.graph.nodes
               if any(op in str(n.target) for op in ("linear", "matmul", "_int_mm", "int8pack"))]
    assert bool(matmuls) == (rows > 1 or K % (group or K) != 0)


@pytest.mark.parametrize("scheme", ["int4", "ternary"])
def test_inductor_vectorizes_one_row_reductions_along_the_packed_bytes(fresh_table, scheme):
    """Inductor reads the one-row reduction's input elements, sorted by their place in the byte, from a buffer:
    as strided views inlined into the reduction it vectorized across output rows through byte transposes
    (an int4 MLP block of SmolLM2 17x slower). Checked on the generated C++ of a gated MLP whose input is
    normalized first, as in a decoder layer."""
    from torch._inductor.utils import run_and_get_code

    def layer(k, n, seed):
        lin = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(seed))
        return QuantLinear.from_linear(lin.weight, None, scheme=scheme, group_size=40)

    gate, up, down = layer(K, 160, 1), layer(K, 160, 2), layer(160, K, 3)

    def block(x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return down(nn.functional.silu(gate(h)) * up(h))

    x = torch.randn(1, 1, K)
    with torch.no_grad():
        want = block(x)
        got, code = run_and_get_code(torch.compile(block, fullgraph=True, dynamic=False), x)
    assert _rel(got, want) < 1e-5
    assert "transpose_mxn" not in "".join(code)


@pytest.mark.parametrize(("scheme", "group"), [("int8", 0), ("int4", 64), ("int4", 48), ("ternary", 0)])
def test_weights_dequantize_a_slice_of_rows_at_a_time_to_the_same_values(scheme, group, monkeypatch):
    """Eagerly the packed weights are unpacked a slice of rows at a time (a slice's int32 unpacking at a time,
    not the layer's); each row is computed alone, so the values are those of one piece, bit for bit."""
    codes, scale = quantize_weight(torch.randn(N, K, generator=torch.Generator().manual_seed(1)), scheme, group)
    packed = pack(codes, scheme)
    whole = quant.dequantize(quant.unpack(packed, scheme, K), scale, group)
    monkeypatch.setattr(quant, "DEQUANTIZE_CHUNK", 5 * K * 4)  # slices of 5 rows: 72 = 14 x 5 + 2
    calls: list[int] = []
    unpack = quant.unpack
    monkeypatch.setattr(quant, "unpack", lambda p, *a: calls.append(p.shape[0]) or unpack(p, *a))
    sliced = quant.dequantize_rows(packed, scale, scheme, group, K)
    assert calls == [5] * 14 + [2]
    assert torch.equal(sliced, whole)
    x = torch.randn(3, K)
    assert torch.equal(quant_linear_reference(x, packed, scale, scheme, group, K), x @ whole.T)
    layer = QuantLinear(K, N, bias=False, scheme=scheme, group_size=group)
    layer.set_codes(codes, scale)
    assert torch.equal(layer.dequantized_weight(), whole)
