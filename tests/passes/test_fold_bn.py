"""fold_bn: Before (Conv/Linear + BatchNorm) -> Expected (Conv/Linear with folded weights, Identity)."""

import copy

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.helpers.zoo import hf_model
from graphopt.passes.fold_bn import folded_weights

_BN = nn.modules.batchnorm._BatchNorm


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def fold(model: nn.Module, x, **kw) -> go.OptimizeResult:
    return go.optimize(model, x, "fold_bn", measure=False, **kw)


def skipped(res: go.OptimizeResult) -> dict[str, str]:
    return {d.target: d.message for d in res.report.passes[0].diagnostics if d.level == "skipped"}


def assert_folds_exactly(model: nn.Module, x: torch.Tensor, fresh: torch.Tensor, n_bn: int) -> go.OptimizeResult:
    """Fold, check every BN became Identity, stats, and outputs on inputs the pass never saw."""
    randomise_bn(model.eval())
    res = fold(model, x)
    record = res.report.passes[0]
    assert record.status == "ok", record.reason
    assert record.stats == {"folded": n_bn, "skipped": 0}
    assert not any(isinstance(m, _BN) for m in res.model.modules())
    with torch.no_grad():
        assert rel_err(res.model(fresh), model(fresh)) < 1e-5
    return res


# --- Before/Expected on single layers ---------------------------------------------------------------------------

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn(nd, bias):
    model = nn.Sequential(CONVS[nd](3, 6, 3, padding=1, bias=bias), BNS[nd](6), nn.ReLU())
    spatial = (6,) * nd
    res = assert_folds_exactly(model, torch.randn(2, 3, *spatial), torch.randn(3, 3, *(s + 1 for s in spatial)), 1)
    conv, bn = res.model[0], model[1]
    assert isinstance(res.model[1], nn.Identity)
    # Expected weights, written out: w * gamma / sqrt(var + eps), (b - mean) * gamma / sqrt(var + eps) + beta.
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = model[0].bias if bias else torch.zeros(6)
    torch.testing.assert_close(conv.weight, model[0].weight * s.view(-1, *[1] * (nd + 1)))
    torch.testing.assert_close(conv.bias, (b - bn.running_mean) * s + bn.bias)
    assert isinstance(conv.bias, nn.Parameter)
    edits = [(e.op, e.target, e.by) for e in res.program.edits]
    assert edits == [("set_tensor", "0.weight", "fold_bn"), ("set_tensor", "0.bias", "fold_bn"),
                     ("replace_module", "1", "fold_bn")]


@pytest.mark.parametrize("groups", [2, 6])  # grouped, depthwise
def test_grouped_and_depthwise_conv(groups):
    model = nn.Sequential(nn.Conv2d(6, 6, 3, groups=groups, bias=False), nn.BatchNorm2d(6))
    assert_folds_exactly(model, torch.randn(2, 6, 8, 8), torch.randn(1, 6, 5, 7), 1)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose(groups):
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups), nn.BatchNorm2d(6))
    assert_folds_exactly(model, torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 6), 1)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d(bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 2))
    assert_folds_exactly(model, torch.randn(4, 5), torch.randn(9, 5), 1)


def test_bn_without_affine():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False))
    res = assert_folds_exactly(model, torch.randn(2, 3, 4, 4), torch.randn(1, 3, 3, 3), 1)
    assert res.model[0].bias is not None


def test_folded_weights_in_float64_then_cast_back():
    """The fold is computed in float64 and returned in the layer's dtype."""
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float16), torch.randn(4, dtype=torch.float16)
    scale, shift = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    new_w, new_b = folded_weights(w, b, scale, shift, kind="conv")
    assert new_w.dtype == new_b.dtype == torch.float16
    torch.testing.assert_close(new_w, (w.double() * scale.view(4, 1, 1, 1)).half())
    torch.testing.assert_close(new_b, (b.double() * scale + shift).half())


# --- BatchNorm that must be left (and reported) -----------------------------------------------------------------

class NotAfterFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)
        self.bn_add = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.conv(self.bn_in(x)))
        return self.bn_add(self.bn_relu(y) + y)


def test_bn_not_after_foldable_op_is_left_and_reported():
    model = randomise_bn(NotAfterFoldable().eval())
    x = torch.randn(2, 3, 5, 5)
    res = fold(model, x)
    assert res.report.passes[0].status == "unchanged"
    assert res.report.passes[0].stats == {"folded": 0, "skipped": 3}
    why = skipped(res)
    assert "model input" in why["bn_in"]
    assert "aten.relu" in why["bn_relu"]
    assert "aten.add" in why["bn_add"]
    assert all(isinstance(getattr(res.model, n), nn.BatchNorm2d) for n in ("bn_in", "bn_relu", "bn_add"))
    assert res.program.edits == []


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y.sigmoid() + self.bn2(self.conv2(x))


def test_conv_output_used_elsewhere_is_left():
    model = randomise_bn(SharedConvOutput().eval())
    x = torch.randn(2, 3, 6, 6)
    res = fold(model, x)
    assert res.report.passes[0].stats == {"folded": 1, "skipped": 1}
    assert "also used by" in skipped(res)["bn"] and "sigmoid" in skipped(res)["bn"]
    assert isinstance(res.model.bn, nn.BatchNorm2d) and isinstance(res.model.bn2, nn.Identity)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-5, atol=1e-5)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_layer_called_twice_is_not_folded():
    model = randomise_bn(CalledTwice().eval())
    res = fold(model, torch.randn(1, 4, 5, 5))
    assert res.report.passes[0].stats == {"folded": 0, "skipped": 1}
    assert "used 2 times" in skipped(res)["bn"]


class OneBNTwoConvs(nn.Module):
    """One BatchNorm module applied after two different convs: both calls fold."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) - self.bn(self.b(x))


def test_bn_module_called_after_two_convs_folds_into_both():
    res = assert_folds_exactly(OneBNTwoConvs(), torch.randn(2, 3, 4, 4), torch.randn(1, 3, 6, 6), 1)
    assert sorted(e.target for e in res.program.edits if e.op == "set_tensor") == ["a.bias", "a.weight",
                                                                                   "b.bias", "b.weight"]


class LinearOverSequence(nn.Module):
    """Linear on (N, L, F) then BatchNorm1d(L): BN's channel dim is L, not the Linear's features."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_bn_on_wrong_dim_of_linear_output_is_left():
    model = randomise_bn(LinearOverSequence().eval())
    res = fold(model, torch.randn(2, 5, 5))
    assert res.report.passes[0].stats == {"folded": 0, "skipped": 1}
    assert "3 dims" in skipped(res)["bn"]


class BatchStatsAndUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.c2(self.bn1(self.c1(x))))


def test_batch_statistics_and_unused_bn_are_reported():
    model = randomise_bn(BatchStatsAndUnused().eval())
    x = torch.randn(2, 3, 4, 4)
    res = fold(model, x)
    assert res.report.passes[0].stats == {"folded": 1, "skipped": 2}
    why = skipped(res)
    assert "track_running_stats=False" in why["bn1"]
    assert "not called" in why["unused"]
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_training_mode_bn_submodule_is_left():
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
    model[1].train()  # the root is in eval mode, this BatchNorm is not
    program = go.capture(model, torch.randn(2, 3, 4, 4))
    result = go.get_pass("fold_bn")().run(program, program.analyses)
    assert not result.modified and "training mode" in result.diagnostics[0].message


def test_training_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    program = go.capture(model, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"eval mode.*model\.eval\(\)"):
        go.get_pass("fold_bn")().run(program, program.analyses)


# --- models ----------------------------------------------------------------------------------------------------

class MobileNetBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 -> 1x1 project, each with BN (MobileNetV2)."""

    def __init__(self, c: int = 8, expand: int = 3):
        super().__init__()
        h = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )
        self.head = nn.Sequential(nn.Linear(c, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        y = self.stem(x)
        y = y + self.block(y)
        return self.head(y.mean((2, 3)))


def test_mobilenet_style_model():
    res = assert_folds_exactly(MobileNetBlock(), torch.randn(2, 3, 16, 16), torch.randn(5, 3, 12, 20), 5)
    assert res.model.block[3].groups == 24 and res.model.block[3].bias is not None


def test_hf_resnet_all_bn_fold():
    model, inputs = hf_model("resnet")
    randomise_bn(model)
    n_bn = sum(isinstance(m, _BN) for m in model.modules())
    assert n_bn == 8
    res = fold(model, inputs)
    assert res.report.passes[0].stats == {"folded": n_bn, "skipped": 0}
    assert f"folded={n_bn}" in str(res.report)
    assert type(res.model) is type(model)
    with torch.no_grad():
        want, got = model(**inputs), res.model(**inputs)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 1e-5
    assert rel_err(got.pooler_output, want.pooler_output) < 1e-5
    replaced = [e.target for e in res.program.edits if e.op == "replace_module"]
    assert len(replaced) == n_bn and all(e.endswith("normalization") for e in replaced)


def test_callers_model_is_untouched():
    model = randomise_bn(MobileNetBlock().eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fold(model, torch.randn(2, 3, 8, 8))
    assert res.model is not model
    assert sum(isinstance(m, _BN) for m in model.modules()) == 5
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem[0].bias is None


def test_direct_pass_on_captured_program():
    model = randomise_bn(MobileNetBlock().eval())
    work = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    program = go.capture(work, x)  # capture does not copy: the pass edits ``work``
    result = go.get_pass("fold_bn")().run(program, program.analyses)
    assert result.modified and result.stats == {"folded": 5, "skipped": 0} and not result.diagnostics
    assert program.module is work and isinstance(work.block[1], nn.Identity)
    assert {e.op for e in program.edits} == {"set_tensor", "replace_module"}
    assert sum(e.op == "replace_module" for e in program.edits) == 5
    with torch.no_grad():
        assert rel_err(work(x), model(x)) < 1e-5


def test_default_preset_folds_through_dropout():
    """remove_dropout runs first, so a Dropout between Conv and BN no longer blocks the fold."""
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.2), nn.BatchNorm2d(4)).eval())
    x = torch.randn(2, 3, 6, 6)
    res = go.optimize(model, x, measure=False)
    assert [r.stats for r in res.report.passes] == [{"removed": 1}, {"folded": 1, "skipped": 0}]
    assert all(isinstance(res.model[i], nn.Identity) for i in (1, 2))
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) < 1e-5


class _DecomposedGraph:
    """An analysis manager whose captured graph is the core-aten decomposition (addmm, convolution, ...)."""

    def __init__(self, program: go.Program):
        self.ep = program.analyses.get("exported").run_decompositions()

    def get(self, name: str):
        assert name == "exported"
        return self.ep


def test_decomposed_graph_ops_fold():
    model = randomise_bn(MobileNetBlock().eval())
    work = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    program = go.capture(work, x)
    am = _DecomposedGraph(program)
    targets = {str(n.target) for n in am.ep.graph.nodes}
    assert {"aten.addmm.default", "aten.convolution.default",
            "aten._native_batch_norm_legit_no_training.default"} <= targets
    result = go.get_pass("fold_bn")().run(program, am)
    assert result.stats == {"folded": 5, "skipped": 0}
    with torch.no_grad():
        assert rel_err(work(x), model(x)) < 1e-5


def test_edits_replay_through_save_and_load(tmp_path):
    model = randomise_bn(MobileNetBlock().eval())
    x = torch.randn(2, 3, 8, 8)
    res = fold(model, x)
    go.save(res, tmp_path)
    back = go.load(tmp_path, MobileNetBlock())  # a fresh base model with other weights
    assert isinstance(back.block[4], nn.Identity) and back.stem[0].bias is not None
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))


def test_meta_device_model_folds_structurally():
    model, inputs = hf_model("resnet")
    model = model.to("meta")
    res = fold(model, {k: v.to("meta") for k, v in inputs.items()})
    assert res.report.passes[0].stats == {"folded": 8, "skipped": 0}
    assert res.model.embedder.embedder.convolution.bias.device.type == "meta"
