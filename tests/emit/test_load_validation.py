"""A tampered ``graphopt.json`` or weight file is refused by ``load`` with one error naming the first mismatch."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import graphopt as go
from graphopt.emit.saved_model import MANIFEST_FILE, WEIGHTS_FILE, SerializationError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.fixture
def saved(tmp_path):
    go.save(go.optimize(_net(), torch.randn(4, 5), "prune(ratio=0.5)", measure=False), tmp_path)
    return tmp_path


def _tamper(directory, change):
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    change(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _set_attr(manifest, name):
    return next(e for e in manifest["edits"] if e["op"] == "set_attr" and e["data"]["name"] == name)


def test_the_untampered_directory_loads(saved):
    model = go.load(saved, _net())
    assert model[0].out_features == 4 and model(torch.randn(2, 5)).shape == (2, 3)


@pytest.mark.parametrize("change, match", [
    (lambda m: _set_attr(m, "in_features")["data"].update(value=[1, 2]),
     r"edit #4 \(set_attr '2'\): in_features holds an int \(8\) but the log sets a list \(\[1, 2\]\)"),
    (lambda m: _set_attr(m, "in_features")["data"].update(value=999),
     r"inconsistent: 2.in_features = 999 but its weight is \[3, 4\]"),
    (lambda m: _set_attr(m, "in_features")["data"].update(value={"a": 1}), r"is not a plain value"),
    (lambda m: _set_attr(m, "in_features")["data"].update(name="in features"), r"must be an attribute name"),
    (lambda m: m["edits"][0]["data"].update(shape=[4, -1]), r"edit #0 .*'shape' must be a list of sizes >= 0"),
    (lambda m: m["edits"][0]["data"].update(dtype="float128"), r"unknown dtype 'float128'"),
    (lambda m: m["edits"][0]["data"].update(buffer="no"), r"'buffer' must be true or false"),
    (lambda m: m.update(aliases={"2.weight": "0.missing"}), r"ties '2.weight' to '0.missing', which is not in"),
    (lambda m: m.update(aliases={"9.weight": "0.weight"}), r"the rebuilt model has no tensor '9.weight'"),
    (lambda m: m.update(nonpersistent_buffers=["0.running_mean"]), r"'0.running_mean' as a non-persistent buffer"),
    (lambda m: m.update(nonpersistent_buffers=[3]), r"non-persistent buffer"),
    (lambda m: m["edits"].append({"op": "set_layout", "target": "0.weight", "data": {"memory_format": "nhwc"}}),
     r"'memory_format' must be one of channels_last, channels_last_3d, got 'nhwc'"),
    (lambda m: m["edits"].append({"op": "set_layout", "target": "0.weight", "data": {"memory_format": "channels_last"}}),
     r"channels_last is for 4-D tensors, this one has shape \[4, 5\]"),
])
def test_tampered_logs_are_refused(saved, change, match):
    _tamper(saved, change)
    with pytest.raises(SerializationError, match=match):
        go.load(saved, _net())


def test_weights_of_another_dtype_are_refused(saved):
    tensors = load_file(str(saved / WEIGHTS_FILE))
    tensors["2.weight"] = tensors["2.weight"].half()
    save_file(tensors, str(saved / WEIGHTS_FILE))
    with pytest.raises(SerializationError, match=r"2.weight \(file float16, model float32; build base_model in the "
                                                 r"saved dtype\)"):
        go.load(saved, _net())
    model = go.load(saved, _net(), strict=False)  # what fits is loaded; the rest stays as rebuilt
    assert model[2].weight.dtype == torch.float32
    assert torch.equal(model[2].weight, tensors["2.weight"].float())


@pytest.mark.parametrize("scheme, tamper, match", [
    ("ternary", lambda t: t.__setitem__("0.qweight", t["0.qweight"] | 0b11), r"code\(s\) outside ternary's range"),
    ("int8", lambda t: t["0.qweight"].view(-1)[0:3].fill_(-128), r"3 code\(s\) outside int8's range \[-127, 127\]"),
    ("int4", lambda t: t["0.scale"].view(-1)[1:2].fill_(float("nan")), r"1 scale\(s\) not finite and positive"),
    ("int4", lambda t: t["0.scale"].view(-1)[0:2].fill_(0.0), r"2 scale\(s\) not finite and positive"),
])
def test_quantized_values_no_quantizer_writes_are_refused(tmp_path, scheme, tamper, match):
    res = go.optimize(_net(), torch.randn(4, 5), f"quantize(scheme={scheme},group_size=0)", measure=False,
                      on_error="raise")
    go.save(res, tmp_path)
    assert go.load(tmp_path, _net()) is not None  # as written, it loads
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    tamper(tensors)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(SerializationError, match=match):
        go.load(tmp_path, _net())


def test_a_quantized_layer_whose_width_disagrees_with_its_packed_codes_is_refused(tmp_path):
    res = go.optimize(_net(), torch.randn(4, 5), "quantize(scheme=int4,group_size=0)", measure=False,
                      on_error="raise")
    go.save(res, tmp_path)
    _tamper(tmp_path, lambda m: next(e for e in m["edits"] if e["op"] == "replace_module" and e["target"] == "0")
            ["data"]["kwargs"].__setitem__("in_features", 7))  # 7 int4 codes pack to 4 bytes a row, 5 to 3
    with pytest.raises(SerializationError, match=r"0\.qweight"):
        go.load(tmp_path, _net())
