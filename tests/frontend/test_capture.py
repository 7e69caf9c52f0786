"""Capture: zoo models through torch.export, the fx path, meta weights, errors that say what to try."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import fx, nn

import graphopt as go
from graphopt.frontend.errors import CaptureError
from graphopt.frontend.inputs import compare_outputs
from graphopt.frontend.inspect import module_tree, op_counts, summarize
from graphopt.frontend.kv_cache import returned_cache
from graphopt.frontend.nodes import (
    graph_view,
    node_module_path,
    node_module_type,
    node_param_fqn,
    param_nodes,
    tied_parameters,
)
from graphopt.helpers.zoo import ZOO, hf_model, llama_meta


def _state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_intact(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]], training: bool) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (ident, value) in before.items():
        assert id(after[k]) == ident, f"{k} was replaced"
        if value.device.type != "meta":
            assert torch.equal(after[k].detach(), value), f"{k} changed"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on {type(m).__name__}"
        assert "forward" not in vars(m), f"forward patched on {type(m).__name__}"
    assert model.training == training


# --- every zoo model -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_captures_with_fqns_and_module_paths(name):
    model, inputs = hf_model(name)
    before = _state(model)
    program = go.capture(model, inputs)
    ep = program.analyses.get("exported")
    _assert_intact(model, before, training=False)

    # The graph computes what the model computes.
    with torch.no_grad():
        err = compare_outputs(ep.module()(**inputs), model(**inputs))
    assert err.max_abs < 1e-5, err

    # Every parameter and buffer (tied names included) has its placeholder.
    expected = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {k for k, _ in model.named_buffers(remove_duplicate=False)}
    names = set(param_nodes(ep))
    assert expected <= names
    assert all("lifted_tensor" in n for n in names - expected), names - expected  # constants made in forward

    # Every op sits in a real module, and each use of a parameter happens inside the module that owns it.
    ops = [n for n in ep.graph.nodes if n.op == "call_function"]
    paths = {node_module_path(n) for n in ops}
    for path in paths:
        model.get_submodule(path)
    assert len(paths) > 3
    for node in ep.graph.nodes:
        fqn = node_param_fqn(ep, node)
        for user in node.users if fqn else ():
            assert node_module_path(user) == fqn.rpartition(".")[0], (fqn, user)

    # The graph view mirrors the fx graph.
    g = program.analyses.get("graph")
    assert g.number_of_nodes() == len(ep.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)
    assert sum(1 for _, d in g.nodes(data=True) if d["kind"] == "op") == len(ops)


def test_graph_view_attributes_on_llama():
    model, inputs = hf_model("llama")
    ep = go.capture(model, inputs).analyses.get("exported")
    g = graph_view(ep)
    q = g.nodes["p_layers_0_self_attn_q_proj_weight"]
    assert (q["kind"], q["param"], q["module"], q["shape"]) == (
        "parameter", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj", (32, 32))
    k_users = [v for v in g.successors("p_layers_0_self_attn_k_proj_weight")]
    assert len(k_users) == 1
    k = g.nodes[k_users[0]]
    # GQA: 2 KV heads of size 8 -> k_proj maps 32 -> 16.
    assert (k["target"], k["module"], k["module_type"], k["shape"]) == (
        "aten.linear.default", "layers.0.self_attn.k_proj", "Linear", (2, 16, 16))
    assert g.edges["p_layers_0_self_attn_k_proj_weight", k_users[0]]["pos"] == [1]
    assert g.nodes["input_ids"]["kind"] == "input" and g.nodes["input_ids"]["dtype"] == "int64"
    assert g.nodes["b_rotary_emb_inv_freq"]["kind"] == "buffer"
    x_mul_x = [n for n, d in g.nodes(data=True) if d["target"] == "aten.pow.Tensor_Scalar"]
    assert len(x_mul_x) == 5  # RMSNorm: 2 per layer + final


def test_tied_parameters_are_reported():
    model, _ = hf_model("t5_encoder")
    assert tied_parameters(model) == [["encoder.embed_tokens.weight", "shared.weight"]]
    assert tied_parameters(nn.Linear(2, 2)) == []


def test_node_helpers_read_strict_and_nonstrict_stacks():
    graph = fx.Graph()
    a, b, c = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("c")
    a.meta["nn_module_stack"] = {"L__self__": ("", "m.Root"), "L__self__h.0": ("h.0", "m.Block"),
                                 "L__self__h.0.mlp": ("h.0.mlp", "transformers.x.MLP")}
    b.meta["nn_module_stack"] = {"x": ("L['self'].layers[3].attn", nn.Linear)}
    assert (node_module_path(a), node_module_type(a)) == ("h.0.mlp", "MLP")
    assert (node_module_path(b), node_module_type(b)) == ("layers.3.attn", "Linear")
    assert (node_module_path(c), node_module_type(c)) == ("", "")
    assert node_param_fqn(None, c) is None


# --- fx path -------------------------------------------------------------------------------------

class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.scale = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.register_buffer("shift", torch.full((8, 1, 1), 0.25))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
        y = self.stem(x)
        y = y + y * self.scale - self.shift
        return self.head(y.mean(dim=(2, 3))) + bias


def test_fx_capture_of_a_traceable_model():
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    program = go.capture(model, {"x": x}, method="fx")
    assert program.analyses.cached("fx_graph") and not program.analyses.cached("exported")
    gm = program.analyses.get("fx_graph")
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert calls == {"stem.0", "stem.1", "stem.2", "head"}
    assert {node_module_path(n) for n in gm.graph.nodes if n.op == "call_module"} == calls
    assert torch.equal(gm(x), model(x))
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["stem_0"] == (2, 8, 8, 8) and shapes["head"] == (2, 4)
    g = graph_view(gm)
    assert g.graph["source"] == "torch.fx"
    assert g.nodes["scale"]["param"] == "scale" and g.nodes["scale"]["kind"] == "parameter"
    assert g.nodes["shift"]["kind"] == "buffer" and g.nodes["shift"]["shape"] == (8, 1, 1)
    assert g.nodes["mul"]["shape"] == (2, 8, 8, 8)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_capture_leaves_train_mode_batchnorm_statistics_alone(method):
    model = _ConvNet().train()
    before = _state(model)
    program = go.capture(model, torch.randn(2, 3, 8, 8), method=method)
    _assert_intact(model, before, training=True)
    assert int(model.stem[1].num_batches_tracked) == 0
    if method == "fx":
        assert "tensor_meta" in next(n for n in program.analyses.get("fx_graph").graph.nodes if n.name == "head").meta


def test_fx_capture_of_a_meta_model_with_cpu_inputs_has_shapes():
    with torch.device("meta"):
        model = _ConvNet().eval()
    gm = go.capture(model, torch.randn(2, 3, 8, 8), method="fx").analyses.get("fx_graph")
    assert tuple(next(n for n in gm.graph.nodes if n.name == "head").meta["tensor_meta"].shape) == (2, 4)


def test_unknown_capture_method():
    with pytest.raises(ValueError, match="'export'.*'fx'"):
        go.capture(nn.Linear(2, 2), torch.randn(1, 2), method="trace")


# --- meta device ---------------------------------------------------------------------------------

def test_meta_llama_captures_without_weight_memory():
    model, inputs = llama_meta("7b", num_layers=2)
    assert all(p.device.type == "meta" for p in model.parameters())
    program = go.capture(model, inputs)
    ep = program.analyses.get("exported")
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0][0]
    assert tuple(out.meta["val"].shape) == (1, 128, 4096)
    g = program.analyses.get("graph")
    assert g.nodes["p_layers_1_mlp_gate_proj_weight"]["shape"] == (11008, 4096)
    assert op_counts(ep)["aten.linear.default"] == 2 * 7
    assert all(p.device.type == "meta" for p in model.parameters())
    assert "on meta" in summarize(program)


def test_meta_llama_405b_shape_captures_and_finds_its_groups():
    model, inputs = llama_meta("405b", num_layers=2)
    program = go.capture(model, inputs)
    g = program.analyses.get("graph")
    assert g.nodes["p_layers_1_self_attn_k_proj_weight"]["shape"] == (1024, 16384)  # 8 key/value heads of 128
    assert g.nodes["p_layers_1_mlp_gate_proj_weight"]["shape"] == (53248, 16384)
    groups = [str(grp) for grp in program.dependency_groups]
    assert len(groups) == 2 * 2  # per layer: the attention's key/value head groups (q, k, v, o), the MLP's units
    assert sum("8 kv-head groups x 128" in grp and "q_proj" in grp and "o_proj" in grp for grp in groups) == 2
    assert sum("53248 channels" in grp for grp in groups) == 2
    assert all(p.device.type == "meta" for p in model.parameters())


# --- errors --------------------------------------------------------------------------------------

class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent branch
            return y
        return -y


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), _Gate())
        self.post = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.block(self.pre(x)))


def test_data_dependent_branch_names_the_module_line_and_fix(capfd):
    model = _Branchy().eval()
    before = _state(model)
    with pytest.raises(CaptureError) as info:
        go.capture(model, torch.randn(2, 4))
    err = info.value
    assert err.module_path == "block.1"
    msg = str(err)
    assert "block.1 (_Gate)" in msg and "data-dependent" in msg and "torch.cond" in msg
    assert "if y.sum() > 0:" in msg and "test_capture.py" in msg
    assert err.op == "aten.item.default"
    assert "aten.sum" in err.partial_graph
    assert "def forward(" not in capfd.readouterr().err  # torch's partial-graph dumps are held back
    _assert_intact(model, before, training=False)


class _ShapeBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] > 1 else x


def test_fx_branch_error_points_to_export_which_handles_shape_branches():
    with pytest.raises(CaptureError) as info:
        go.capture(_Branchy().eval(), torch.randn(2, 4), method="fx")
    assert info.value.module_path == "block.1"
    assert "torch.cond" in str(info.value) and "method='export'" in str(info.value)
    with pytest.raises(CaptureError, match="method='export'"):
        go.capture(_ShapeBranch(), torch.randn(2, 4), method="fx")
    ep = go.capture(_ShapeBranch(), torch.randn(2, 4)).analyses.get("exported")  # the advice works
    assert op_counts(ep) == {"aten.mul.Tensor": 1}


def test_default_config_decoder_captures_without_its_kv_cache_and_keeps_use_cache():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # default config: use_cache=True
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    before = _state(model)
    program = go.capture(model, {"input_ids": ids})
    outputs = [str(s.arg.name) for s in program.analyses.get("exported").graph_signature.output_specs]
    assert len(outputs) == 1  # last_hidden_state only: no cache tensors in the graph
    assert model.config.use_cache is True and "Cache" in type(returned_cache(model(input_ids=ids))).__name__
    _assert_intact(model, before, training=False)


def test_a_cache_asked_for_in_the_inputs_says_what_to_drop():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaModel(cfg).eval()
    with pytest.raises(CaptureError) as info:
        go.capture(model, {"input_ids": torch.randint(0, 64, (1, 8)), "use_cache": True})
    assert info.value.module_path is None
    assert "DynamicCache" in str(info.value) and "drop use_cache=True" in str(info.value)
    assert model.config.use_cache is True


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _ReturnsBox(nn.Module):
    def forward(self, x: torch.Tensor) -> _Box:
        return _Box(x * 2)


def test_unknown_output_type_says_register_pytree():
    with pytest.raises(CaptureError, match=r"contains a _Box(.|\n)*register_pytree_node"):
        go.capture(_ReturnsBox(), torch.randn(2))


def test_shape_error_names_the_inner_module_and_op():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(4, 2)).train()
    before = _state(model)
    with pytest.raises(CaptureError) as info:
        go.capture(model, torch.randn(3, 4))
    assert info.value.module_path == "1"
    assert info.value.op.startswith("aten.")
    assert "module: 1 (Linear)" in str(info.value) and "float32[3, 4]" in str(info.value)
    _assert_intact(model, before, training=True)


def test_wrong_input_name_shows_the_inputs_given():
    model, inputs = hf_model("llama")
    with pytest.raises(CaptureError) as info:
        go.capture(model, {"inputs_ids": inputs["input_ids"]})
    assert info.value.module_path == ""
    assert "(root) LlamaModel" in str(info.value) and "inputs_ids=int64[2, 16]" in str(info.value)


def test_fx_on_a_hf_model_points_to_export():
    model, inputs = hf_model("bert")
    before = _state(model)
    with pytest.raises(CaptureError, match="torch.export"):
        go.capture(model, inputs, method="fx")
    _assert_intact(model, before, training=False)


# --- summary -------------------------------------------------------------------------------------

def test_summarize_llama():
    model, inputs = hf_model("llama")
    program = go.capture(model, inputs)
    text = summarize(program)
    ep = program.analyses.get("exported")
    n_linear = sum(1 for n in ep.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert n_linear == 14
    assert any(line.split() == ["aten.linear.default", str(n_linear)] for line in text.splitlines())
    assert f"{len(ep.graph.nodes)} graph nodes" in text
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,}" in text
    assert "input_ids" in text and "int64[2, 16]" in text
    assert any(line.split() == ["last_hidden_state", "float32[2,", "16,", "32]"] for line in text.splitlines())
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    assert any("layers.0..1" in line and f"2 x {per_layer:,}" in line for line in module_tree(model))
    assert len(module_tree(model, max_depth=0)) == 1
    assert len(module_tree(model, max_depth=1)) == 1 + len(list(model.children()))
    short = summarize(program, max_depth=1, max_ops=3)
    assert "layers.0..1" not in short and short.splitlines()[-1].startswith("  ... ")


def test_summarize_names_outputs_of_tuple_models():
    model = nn.Sequential(nn.Linear(4, 4))

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x), {"aux": x.sum(0)}

    text = summarize(go.capture(Pair(), torch.randn(3, 4)))
    assert "[0]" in text and "[1].aux" in text and "float32[4]" in text
