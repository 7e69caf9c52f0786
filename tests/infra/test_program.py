"""The Program's edit API: each edit changes the module, is logged as JSON, and replays on a fresh model."""

import json

import pytest
import torch
from torch import nn

from graphopt.infra.program import Edit, EditError, Program, replay_edits


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.fc2 = nn.Linear(16, 4, bias=False)
        self.register_buffer("shift", torch.zeros(4), persistent=False)
        self.scale = 1.0

    def forward(self, x):
        return self.fc2(self.block(self.bn(self.fc1(x)))) * self.scale + self.shift


class Gain(nn.Module):
    """A user module that opts in to replay with graphopt_spec."""

    def __init__(self, width: int, init: float = 1.0):
        super().__init__()
        self.width, self.init = width, init
        self.gain = nn.Parameter(torch.full((width,), init))

    def forward(self, x):
        return x * self.gain

    def graphopt_spec(self):
        return {"width": self.width, "init": self.init}


class Opaque(nn.Module):
    def forward(self, x):
        return x


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def _structure(m: nn.Module) -> dict:
    """Module classes, tensor shapes/kinds and plain attributes: what replay must reproduce."""
    out = {n: type(mod).__name__ for n, mod in m.named_modules()}
    for name, mod in m.named_modules():
        for k, v in mod._parameters.items():
            out[f"{name}.{k}"] = None if v is None else ("param", tuple(v.shape), v.dtype, v.requires_grad)
        for k, v in mod._buffers.items():
            out[f"{name}.{k}"] = None if v is None else ("buffer", tuple(v.shape), v.dtype,
                                                        k not in mod._non_persistent_buffers_set)
        for k, v in vars(mod).items():
            if isinstance(v, (int, float, tuple)) and not k.startswith("_"):
                out[f"{name}:{k}"] = v
    return out


def _replayed(program: Program) -> nn.Module:
    """Round-trip the log through JSON and replay it on a freshly built Net."""
    edits = [Edit.from_dict(d) for d in json.loads(json.dumps([e.to_dict() for e in program.edits]))]
    return replay_edits(_net(), edits)


def test_replace_module_returns_old_and_logs_a_spec():
    p = Program(_net(), _x())
    old = p.replace_module("fc1", nn.Linear(8, 16, bias=False))
    assert isinstance(old, nn.Linear) and old.bias is not None
    (edit,) = p.edits
    assert (edit.op, edit.target) == ("replace_module", "fc1")
    assert edit.data == {"class": "torch.nn.modules.linear.Linear", "dtype": "float32",
                         "kwargs": {"in_features": 8, "out_features": 16, "bias": False}}
    assert p.module.fc1.bias is None


def test_replace_module_rejects_root_and_non_modules():
    p = Program(_net(), _x())
    with pytest.raises(EditError, match="root module cannot be replaced"):
        p.replace_module("", nn.Identity())
    with pytest.raises(EditError, match="not a submodule"):
        p.replace_module("scale", nn.Identity())
    with pytest.raises(EditError, match="no submodule"):
        p.replace_module("nope.fc", nn.Identity())
    assert p.edits == []


def test_set_tensor_creates_and_removes_and_keeps_kinds():
    p = Program(_net(), _x())
    p.set_tensor("fc2.bias", torch.ones(4))  # a bias where there was none: a new parameter
    p.set_tensor("fc1.bias", None)  # removed
    p.set_tensor("shift", torch.full((4,), 0.5))  # a non-persistent buffer stays one
    m = p.module
    assert isinstance(m.fc2.bias, nn.Parameter) and torch.equal(m.fc2.bias, torch.ones(4))
    assert m.fc1.bias is None and "fc1.bias" not in m.state_dict()
    assert "shift" in m._buffers and "shift" not in m.state_dict()
    assert [e.data for e in p.edits] == [
        {"shape": [4], "dtype": "float32", "buffer": False, "requires_grad": True},
        {"remove": True, "buffer": False},
        {"shape": [4], "dtype": "float32", "buffer": True, "persistent": False},
    ]
    with pytest.raises(EditError, match="neither a parameter nor a buffer"):
        p.set_tensor("fc1.nothing", None)
    assert _structure(_replayed(p)) == _structure(m)


def test_set_tensor_int_parameter_and_frozen_grad_replay():
    p = Program(_net(), _x())
    p.module.fc2.weight.requires_grad_(False)
    p.set_tensor("fc2.weight", torch.zeros(4, 16))
    p.set_tensor("fc1.codes", torch.zeros(3, dtype=torch.int8))
    assert p.module.fc2.weight.requires_grad is False and p.module.fc1.codes.requires_grad is False
    replayed = _replayed(p)
    assert replayed.fc2.weight.requires_grad is False
    assert replayed.fc1.codes.dtype == torch.int8
    assert _structure(replayed) == _structure(p.module)


def test_resize_and_set_attr_shrink_a_hidden_dim():
    p = Program(_net(), _x())
    keep = [0, 3, 5, 9]
    w1 = p.tensor("fc1.weight").clone()
    p.resize("fc1.weight", 0, keep)
    p.resize("fc1.bias", 0, torch.tensor(keep))
    p.set_attr("fc1", "out_features", 4)
    for t in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        p.resize(t, 0, keep)
    p.set_attr("bn", "num_features", 4)
    p.replace_module("block", nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    assert torch.equal(p.module.fc1.weight, w1[keep])
    assert isinstance(p.module.bn.running_mean, torch.Tensor) and "bn.running_mean" in p.module.state_dict()
    assert p.run().shape == (5, 4)  # the edited model still runs
    replayed = _replayed(p)
    assert _structure(replayed) == _structure(p.module)
    replayed.load_state_dict(p.module.state_dict())
    with torch.no_grad():
        assert torch.equal(replayed(_x()), p.run())


def test_set_attr_must_be_json_and_tuples_survive():
    p = Program(_net(), _x())
    with pytest.raises(EditError, match="JSON-serialisable"):
        p.set_attr("fc1", "thing", object())
    p.set_attr("", "scale", 2.5)
    p.set_attr("bn", "shape_hint", (4, 2))
    replayed = _replayed(p)
    assert replayed.scale == 2.5 and replayed.bn.shape_hint == (4, 2)
    with torch.no_grad():
        replayed.load_state_dict(p.module.state_dict())
        assert torch.allclose(replayed(_x()), 2.5 * _net()(_x()), atol=1e-6)


def test_replay_order_edits_inside_a_replaced_module():
    p = Program(_net(), _x())
    p.replace_module("block", nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 16)))
    p.replace_module("block.1", Gain(12, init=0.5))  # a child of the module replaced just above
    p.resize("block.0.weight", 0, list(range(6)))
    p.resize("block.0.bias", 0, list(range(6)))
    p.set_attr("block.0", "out_features", 6)
    p.replace_module("block.1", Gain(6))
    p.resize("block.2.weight", 1, list(range(6)))
    p.set_attr("block.2", "in_features", 6)
    replayed = _replayed(p)
    assert [type(m).__name__ for m in replayed.block] == ["Linear", "Gain", "Linear"]
    assert _structure(replayed) == _structure(p.module)
    replayed.load_state_dict(p.module.state_dict())
    with torch.no_grad():
        assert torch.equal(replayed(_x()), p.run())
    # Without the first edit, the original two-layer block has no block.2: the error names the edit.
    with pytest.raises(EditError, match=r"edit #5 \(set_tensor 'block.2.weight'\).*no submodule 'block.2'"):
        replay_edits(_net(), p.edits[1:])


def test_unrecordable_module_is_marked_not_refused():
    p = Program(_net(), _x())
    p.current_pass = "my_pass"
    p.replace_module("block", Opaque())
    (edit,) = p.edits
    assert edit.by == "my_pass"
    assert "graphopt_spec" in edit.data["unrecordable"] and "Opaque" in edit.data["unrecordable"]
    with pytest.raises(EditError, match="by pass 'my_pass'.*not recorded"):
        replay_edits(_net(), p.edits)


def test_snapshot_restore_truncates_the_log_and_keeps_identity():
    net = _net()
    p = Program(net, _x())
    p.replace_module("bn", nn.Identity())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snap = p.snapshot()
    p.resize("fc1.weight", 0, [0, 1])
    p.set_attr("", "scale", 3.0)
    p.replace_module("fc2", nn.Linear(16, 2))
    assert len(p.edits) == 4
    p.restore(snap)
    assert p.module is net  # callers holding the root keep a valid object
    assert [e.op for e in p.edits] == ["replace_module"]
    assert net.scale == 1.0 and net.fc1.weight.shape == (16, 8) and net.fc2.out_features == 4
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert _structure(_replayed(p)) == _structure(net)


def test_replay_on_meta_model_allocates_nothing():
    p = Program(_net(), _x())
    p.replace_module("fc1", nn.Linear(8, 32))
    p.set_tensor("fc2.bias", torch.zeros(4))
    with torch.device("meta"):
        base = Net()
    replay_edits(base, p.edits)
    assert base.fc1.weight.is_meta and base.fc2.bias.is_meta and base.fc1.weight.shape == (32, 8)


def test_replay_rejects_bad_records():
    with pytest.raises(EditError, match="unknown edit op 'fuse'"):
        replay_edits(_net(), [Edit("fuse", "fc1")])
    with pytest.raises(EditError, match="unknown dtype"):
        replay_edits(_net(), [Edit("set_tensor", "fc1.bias", {"shape": [16], "dtype": "load"})])
    with pytest.raises(EditError, match="not an nn.Module class"):
        replay_edits(_net(), [Edit("replace_module", "fc1", {"class": "graphopt.emit.save.save",
                                                             "kwargs": {"obj": None, "directory": "/tmp/x"}})])
    with pytest.raises(EditError, match="refusing to build os.system"):
        replay_edits(_net(), [Edit("replace_module", "fc1", {"class": "os.system", "kwargs": {}})])




@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_trial_swap_is_unrecorded_and_always_undone(error):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    program = Program(model, torch.randn(2, 4))
    originals = [model[0], model[2][0]]
    with program.trial({"0": nn.Identity(), "2.0": nn.Linear(4, 2)}) as old:
        assert isinstance(model[0], nn.Identity) and model[2][0] is not originals[1]
        assert old == {"0": originals[0], "2.0": originals[1]}
    assert [model[0], model[2][0]] == originals and program.edits == []
    with pytest.raises(error), program.trial({"0": nn.Identity()}):
        raise error()
    assert model[0] is originals[0]


class _Recorded(list):
    """A calibration list that records which batches are read (by index or by iteration)."""

    def __init__(self, items):
        super().__init__(items)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def test_calib_batches_spreads_over_a_sequence_and_takes_the_head_of_an_iterable():
    items = list(range(10))
    program = Program(Net(), torch.randn(2, 8), calib=items)
    assert program.calib_batches(3) == [0, 4, 9] and program.calib_batches(1) == [0]
    assert program.calib_batches(20) == items and program.calib_batches() == items
    program.calib = iter(range(10))  # a DataLoader-like iterable: no len, no indexing
    assert program.calib_batches(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="reads calibration data: pass calib="):
        Program(Net(), torch.randn(2, 8)).calib_batches(2)


@pytest.mark.parametrize("pipeline", ["prune(ratio=0.2,importance=taylor,calib_batches=3)",
                                      "quantize(method=gptq,calib_batches=3)", "replace_blocks(calib_batches=3)",
                                      "merge_layers(latency=0.8,cost=macs,calib_batches=3)",
                                      "dyt(mode=calibrated,batches=3)"])
def test_every_pass_reads_calibration_spread_over_the_data(pipeline):
    """Each pass picks its batches with Program.calib_batches: the last batch of a long list is read too (taking
    the first N would miss data sorted by length or source)."""
    import graphopt as go
    from graphopt.helpers.zoo import hf_model

    g = torch.Generator().manual_seed(0)
    if pipeline.startswith("merge_layers"):  # LayerMerge removes activations between convs
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 4)).eval()
        inputs = torch.randn(2, 1, 8, 8)
        calib = _Recorded([torch.randn(2, 1, 8, 8, generator=g) for _ in range(80)])
    else:
        model, inputs = hf_model("bert", layers=2)
        calib = _Recorded([{**inputs, "input_ids": torch.randint(0, model.config.vocab_size,
                                                                 inputs["input_ids"].shape, generator=g)}
                           for _ in range(80)])
    res = go.optimize(model, inputs, pipeline, calib=calib, measure=False, on_error="raise")
    assert res.report.records[-1].status == "ok"
    assert 79 in calib.read
