"""Module specs: torch.nn and graphopt modules described as JSON and rebuilt without pickle."""

import copy
import json

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.nn import spec as ms

from ..infra.test_program import Gain, Opaque


def test_module_specs_round_trip():
    mods = [
        nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1, bias=False),
        nn.Conv1d(4, 4, 5, padding="same", groups=2),
        nn.LayerNorm([6, 4], eps=1e-3, bias=False),
        nn.Embedding(10, 3, padding_idx=2, max_norm=1.0),
        nn.BatchNorm2d(5, momentum=None),
        nn.Dropout(0.25),
        nn.Linear(3, 2).to(torch.float64),
        nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.ModuleList([nn.Identity(), nn.Tanh()])),
        nn.ModuleDict({"a": nn.ReLU(), "b": nn.Linear(2, 2, bias=False)}),
    ]
    for m in mods:
        spec = json.loads(json.dumps(ms.module_spec(m)))
        rebuilt = ms.build_module(spec)
        assert type(rebuilt) is type(m) and repr(rebuilt) == repr(m)
        assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}


def test_module_spec_errors_and_opt_in():
    with pytest.raises(go.ModuleSpecError, match="child '1'.*Opaque"):
        ms.module_spec(nn.Sequential(nn.ReLU(), Opaque()))
    spec = ms.module_spec(Gain(3, init=2.0))
    # A fresh process has not described a Gain yet: an imported class with graphopt_spec is still found.
    ms._ALLOWED_CLASSES.pop(spec["class"], None)
    rebuilt = ms.build_module(spec)
    assert isinstance(rebuilt, Gain) and rebuilt.width == 3 and torch.equal(rebuilt.gain, torch.full((3,), 2.0))
    with pytest.raises(go.ModuleSpecError, match="cannot build .*Linear from kwargs"):
        ms.build_module({"class": "torch.nn.modules.linear.Linear", "kwargs": {"width": 3}})


def test_module_with_integer_first_tensor_keeps_float_dtype():
    class Packed(nn.Module):
        def __init__(self, n: int = 4):
            super().__init__()
            self.n = n
            self.register_buffer("codes", torch.zeros(n, dtype=torch.uint8))
            self.scale = nn.Parameter(torch.ones(n, dtype=torch.float16))

        def graphopt_spec(self):
            return {"n": self.n}

    spec = ms.module_spec(Packed())
    assert spec["dtype"] == "float16"  # the first *floating* tensor, not the uint8 codes
    rebuilt = ms.build_module(copy.deepcopy(spec))
    assert rebuilt.codes.dtype == torch.uint8 and rebuilt.scale.dtype == torch.float16


def test_files_saved_before_the_move_still_name_their_classes():
    from graphopt.nn.dyt import DyT

    spec = ms.module_spec(DyT(6, alpha0=0.3))
    assert spec["class"] == "graphopt.nn.dyt.DyT"
    rebuilt = ms.build_module({**spec, "class": "graphopt.norms.DyT"})  # the path graphopt 0.1 files hold
    assert type(rebuilt) is DyT and rebuilt.graphopt_spec() == DyT(6, alpha0=0.3).graphopt_spec()


def test_graphopts_own_modules_carry_their_spec_version_and_other_versions_are_named():
    from graphopt.nn.quant import QuantLinear

    layer = QuantLinear(8, 4, scheme="int4", group_size=4)
    spec = ms.module_spec(layer)
    assert spec["version"] == QuantLinear.graphopt_spec_version == 2
    assert isinstance(ms.build_module(json.loads(json.dumps(spec))), QuantLinear)
    older = {k: v for k, v in spec.items() if k != "version"}  # saved before versions: the version-1 layout
    assert ms.build_module(older).group_size == 4
    with pytest.raises(ms.ModuleSpecError, match=r"QuantLinear was saved in its spec version 3, newer .*upgrade"):
        ms.build_module({**spec, "version": 3})


def test_a_w8a8_layer_saved_when_per_tensor_activations_were_called_dynamic_loads_as_per_tensor():
    from graphopt.nn.quant import QuantLinear

    spec = ms.module_spec(QuantLinear(8, 4, scheme="int8", group_size=0, activations="per_tensor"))
    assert spec["kwargs"]["activations"] == "per_tensor"
    old = {**spec, "version": 1, "kwargs": {**spec["kwargs"], "activations": "dynamic"}}
    assert ms.build_module(old).activations == "per_tensor"
    with pytest.raises(ValueError, match="unknown activations 'dynamic'"):  # no second name in the current version
        ms.build_module({**old, "version": 2})


def test_an_older_spec_version_is_upgraded_where_the_class_says_how_and_refused_by_name_otherwise(monkeypatch):
    from graphopt.nn.dyt import DyT

    spec = ms.module_spec(DyT(6))
    monkeypatch.setattr(DyT, "graphopt_spec_version", 2)
    with pytest.raises(ms.ModuleSpecError, match=r"DyT was saved in its spec version 1, which this graphopt \(version 2\)"):
        ms.build_module(spec)
    monkeypatch.setattr(DyT, "graphopt_spec_upgrade", staticmethod(lambda kwargs, version: {**kwargs, "alpha0": 0.25}),
                        raising=False)
    assert ms.build_module(spec).alpha0 == 0.25
