"""Pipeline text: parsing, type checking, canonical round-trip, presets, suggestions."""

from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphopt as go


@go.register_pass("t_opts", replace=True)
@dataclass
class OptsPass(go.Pass):
    """Test pass with one option of each kind."""

    ratio: float = 0.5
    steps: int = 10
    mode: Literal["init", "calibrated"] = "init"
    where: str = "*"
    enabled: bool = True
    layers: list[int] | None = None

    def run(self, program, am):
        return go.PassResult(modified=False)


def test_parse_defaults_and_options():
    p = go.parse_pipeline("t_opts, t_opts(ratio=0.3, steps=5, mode=calibrated, where='encoder.*', enabled=false)")
    assert len(p) == 2
    assert p[0] == OptsPass()
    assert p[1] == OptsPass(ratio=0.3, steps=5, mode="calibrated", where="encoder.*", enabled=False)


def test_positional_binds_fields_in_order_and_ints_widen_to_float():
    (p,) = go.parse_pipeline("t_opts(1, 7)")
    assert p.ratio == 1.0 and isinstance(p.ratio, float) and p.steps == 7


def test_list_option():
    (p,) = go.parse_pipeline("t_opts(layers=[1,2,3])")
    assert p.layers == [1, 2, 3]


def test_canonical_text_omits_defaults_and_round_trips():
    p = go.parse_pipeline("t_opts( ratio = 0.25 ,mode=calibrated), remove_dropout")
    text = str(p)
    assert text == "t_opts(ratio=0.25,mode=calibrated),remove_dropout"
    assert go.parse_pipeline(text) == p


@given(ratio=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), steps=st.integers(-10**6, 10**6),
       where=st.text(alphabet="abcXYZ_.*?,() '=[]", max_size=12), enabled=st.booleans(),
       layers=st.none() | st.lists(st.integers(-5, 5), max_size=4))
def test_round_trip_property(ratio, steps, where, enabled, layers):
    p = go.Pipeline([OptsPass(ratio=ratio, steps=steps, where=where, enabled=enabled, layers=layers)])
    again = go.parse_pipeline(str(p))
    assert again == p
    assert again[0] == p[0]


@pytest.mark.parametrize("text, match", [
    ("remove_dropuot", "did you mean 'remove_dropout'"),
    ("t_opts(ratoi=0.1)", "did you mean 'ratio'"),
    ("t_opts(steps=1.5)", r"expected int, got float 1.5"),
    ("t_opts(steps=true)", "expected int"),
    ("t_opts(mode=calibrate)", "not one of init, calibrated; did you mean 'calibrated'"),
    ("t_opts(ratio=abc)", "expected float"),
    ("t_opts(1,2,3,4,5,6,7)", "at most 6 positional"),
    ("t_opts(ratio=0.1, 5)", "positional value '5' after keyword"),
    ("t_opts(ratio=0.1", "unclosed"),
    ("t_opts,,remove_dropout", "stray comma"),
    ("t_opts(ratio=0.1, ratio=0.2)", "given twice"),
    ("remove_dropout(foo=1)", "has no option 'foo'"),
    ("9lives", "cannot parse"),
])
def test_bad_pipelines_name_the_problem(text, match):
    with pytest.raises(go.PipelineError, match=match):
        go.parse_pipeline(text)


def test_presets_expand(monkeypatch):
    from graphopt.infra import registry

    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))  # keep the preset local to this test
    go.register_preset("t_preset", "t_opts(ratio=0.1),remove_dropout")
    p = go.parse_pipeline("t_preset,t_opts")
    assert str(p) == "t_opts(ratio=0.1),remove_dropout,t_opts"
    assert "t_preset" in go.list_presets()
    with pytest.raises(go.PipelineError, match="preset 't_preset' takes no options"):
        go.parse_pipeline("t_preset(ratio=1)")


def test_empty_pipeline_is_allowed():
    assert len(go.parse_pipeline("")) == 0


def test_list_of_passes_and_texts():
    from graphopt.infra.pipeline import as_pipeline

    p = as_pipeline([OptsPass(steps=3), "remove_dropout", OptsPass])
    assert str(p) == "t_opts(steps=3),remove_dropout,t_opts"
    with pytest.raises(go.PipelineError, match="must be go.Pass instances"):
        go.Pipeline([object()])


def test_a_renamed_option_says_how_to_write_it_now():
    with pytest.raises(go.PipelineError, match=r"quantize has no option 'act_scales' any more: .*activations=per_token"):
        go.parse_pipeline("quantize(scheme=w8a8,act_scales=token)")
    assert go.parse_pipeline("quantize(scheme=w8a8,activations=per_token)")[0].activations == "per_token"
    with pytest.raises(go.PipelineError, match="has no option 'act_scale'"):  # an unknown name stays unknown
        go.parse_pipeline("quantize(act_scale=token)")


def test_map_values_round_trip_and_bad_maps_are_named():
    p = go.parse_pipeline("quantize(layers={'*.mlp.*': int8, model.layers.0.*: int4/g64, 'a:b': float})")[0]
    assert p.layers == {"*.mlp.*": "int8", "model.layers.0.*": "int4/g64", "a:b": "float"}
    assert go.parse_pipeline(str(p))[0].layers == p.layers
    for text, match in [("quantize(layers={x: int8)", "unclosed"), ("quantize(layers={x int8})", "not key: value"),
                        ("quantize(layers={x: int8, x: int4})", "given twice"),
                        ("quantize(layers=[int8])", "expected a map"),
                        ("quantize(layers={x: [1]})", r"layers=...\)\['x'\]: expected str")]:
        with pytest.raises(go.PipelineError, match=match):
            go.parse_pipeline(text)
