"""drop_blocks / replace_blocks: span choice, exact linear maps, HF models as users hold them, save/load, bad input."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.analysis.blocks import find_blocks
from graphopt.analysis.depth_stats import LinearMapStats, span_distances
from graphopt.emit.save import compact_edits
from graphopt.helpers.hf_reload import reload_with_transformers, write_for_reload
from graphopt.helpers.zoo import hf_model
from graphopt.infra.manager import PassFailedError
from graphopt.infra.program import Edit
from graphopt.nn.depth import LinearBlock

pytestmark = pytest.mark.usefixtures("one_thread")


class AffineBlock(nn.Module):
    """``h + h A + a``: a block whose every span is an affine map, so a linear replacement is exact."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return h + 0.3 * self.lin(h)


class Stack(nn.Module):
    def __init__(self, width: int = 12, depth: int = 5, block: type = AffineBlock) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(torch.tanh(h))


def _calib(n=6, shape=(4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _text_calib(model, n=4, seed=0, mask=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        batch = {"input_ids": ids}
        if mask:
            am = torch.ones(2, 12, dtype=torch.long)
            am[1, 9:] = 0
            batch["attention_mask"] = am
        out.append(batch)
    return out


# --- the statistics -----------------------------------------------------------------------------------

def test_streamed_least_squares_equals_a_reference_solve_with_padding_left_out():
    g = torch.Generator().manual_seed(1)
    stats = LinearMapStats(7, 5, bias=True)
    xs, ys = [], []
    for _ in range(4):
        x, y = torch.randn(30, 7, generator=g), torch.randn(30, 5, generator=g)
        base = torch.randn(30, 5, generator=g)
        stats.add(x, y, base)
        xs.append(x)
        ys.append(y - base)
    weight, bias = stats.solve(ridge=0.0)
    x = torch.cat([torch.cat(xs), torch.ones(120, 1)], 1).double()
    ref = torch.linalg.lstsq(x, torch.cat(ys).double()).solution
    assert torch.allclose(weight.double(), ref[:-1], atol=1e-5) and torch.allclose(bias.double(), ref[-1], atol=1e-5)
    assert stats.rows == 120 and stats.samples()[0].shape == (120, 7)


def test_span_distances_are_angles_between_block_boundaries_over_unmasked_tokens():
    model = Stack().eval()
    example = _calib(1)[0]
    blocks = find_blocks(model, example)
    assert blocks.path == "blocks" and len(blocks) == 5 and not blocks.special
    got = span_distances(model, blocks, _calib(2), n=2)
    hidden = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: hidden.append(a[0]))]
    hooks += [b.register_forward_hook(lambda m, a, o: hidden.append(o)) for b in model.blocks]
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for x in _calib(2):
            hidden.clear()
            model(x)
            for s in range(4):
                cos = nn.functional.cosine_similarity(hidden[s].double(), hidden[s + 2].double(), dim=-1)
                sums[s] += (torch.arccos(cos.clamp(-1, 1)) / torch.pi).sum()
    for h in hooks:
        h.remove()
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), sums / (2 * 4 * 5), atol=1e-9)


# --- exactness on affine blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("start,n", [(1, 2), (0, 3), (3, 2)])
def test_replacing_affine_blocks_by_a_linear_block_is_exact(start, n):
    model = Stack().eval()
    calib = _calib()
    res = go.optimize(model, calib[0], f"replace_blocks(n={n},start={start},fold=false)", calib=calib,
                      measure=False, on_error="raise")
    blocks = res.model.blocks
    assert len(blocks) == 5 - n + 1 and isinstance(blocks[start], LinearBlock) and blocks[start].replaces == n
    with torch.no_grad():
        for x in _calib(3, seed=9):  # held-out inputs
            ref, got = model(x), res.model(x)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    dropped = go.optimize(model, calib[0], f"drop_blocks(n={n},start={start})", measure=False).model
    with torch.no_grad():
        assert (dropped(calib[0]) - model(calib[0])).abs().max() > 1e-3  # dropping them is not exact


class ResidualMLP(nn.Module):
    """Pre-norm-like: ``h + down(relu(up(h)))`` (the output is the input plus the down-projection's output)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class PostNormMLP(ResidualMLP):
    """Post-norm: ``LayerNorm(h + down(relu(up(h))))`` -- nothing to fold into."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(h))


def test_folded_map_is_the_least_squares_solution_on_the_previous_blocks_mlp_output():
    model = Stack(depth=4, block=ResidualMLP).eval()
    calib = _calib()
    res = go.optimize(model, calib[0], "replace_blocks(n=2,start=2)", calib=calib, measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert rec.stats["folded"] == 1 and len(res.model.blocks) == 2
    assert not any(isinstance(m, LinearBlock) for m in res.model.modules())
    assert sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in model.parameters())
    ms, ys, ls = [], [], []  # the reference solve, from activations this test records itself
    with torch.no_grad():
        for x in calib:
            h1 = model.blocks[0](model.embed(x))
            m = model.blocks[1].down(torch.relu(model.blocks[1].up(h1)))
            ms.append(m.reshape(-1, 12))
            ys.append(h1.reshape(-1, 12))
            ls.append(model.blocks[3](model.blocks[2](h1 + m)).reshape(-1, 12))
    m, y, target = torch.cat(ms).double(), torch.cat(ys).double(), torch.cat(ls).double()
    m1 = torch.cat([m, torch.ones(m.shape[0], 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(m1, target - y).solution
    with torch.no_grad():
        got = res.model.blocks[1](model.blocks[0](model.embed(calib[0]))).reshape(-1, 12).double()
    assert torch.allclose(got, y[:20] + m1[:20] @ ref, atol=1e-4, rtol=1e-4)  # float32 layer vs float64 solve


def test_post_norm_blocks_get_a_linear_block_and_say_why():
    model = Stack(depth=4, block=PostNormMLP).eval()
    calib = _calib()
    res = go.optimize(model, calib[0], "replace_blocks(n=1,start=2)", calib=calib, measure=False, on_error="raise")
    rec = res.report.records[-1]
    assert rec.stats["folded"] == 0 and isinstance(res.model.blocks[2], LinearBlock)
    assert any("cannot be folded" in d.message and d.target == "blocks.2" for d in rec.diagnostics)


# --- HF models as users hold them (default configs: KV caches on) ---------------------------------------

HF = ["llama_causal_lm", "qwen2_causal_lm", "gpt2_lm_head", "bert", "t5_encoder"]
LAYER_COUNT = {"llama_causal_lm": "num_hidden_layers", "qwen2_causal_lm": "num_hidden_layers",
               "gpt2_lm_head": "n_layer", "bert": "num_hidden_layers", "t5_encoder": "num_layers"}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", HF)
@pytest.mark.parametrize("pipeline", ["drop_blocks(n=2)", "replace_blocks(n=1)", "replace_blocks(n=1,start=2)"])
def test_depth_rewrites_on_hf_models_keep_class_outputs_generate_and_config(name, pipeline):
    model, inputs = hf_model(name, layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = go.optimize(model, inputs, pipeline, calib=_text_calib(model), measure=False, on_error="raise")
    rec = res.report.records[-1]
    m = res.model
    assert type(m) is type(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    assert _outputs(m, inputs).shape == _outputs(model, inputs).shape
    n = 2 if "n=2" in pipeline else 1
    spans = [d for d in rec.diagnostics if d.message.startswith("angular distance")]
    assert len(spans) == 4 - n + 1 and sum("(chosen)" in d.message for d in spans) == 1
    blocks = find_blocks(m, inputs)  # found again after a LinearBlock took a block's place
    assert (rec.stats["start"] in blocks.special) == (rec.stats.get("folded") == 0)
    real = [b for b in blocks.names if not isinstance(m.get_submodule(b), LinearBlock)]
    assert len(real) == 4 - n == rec.stats["blocks_after"]
    if rec.stats.get("folded", 1) or "drop" in pipeline:
        assert getattr(m.config, LAYER_COUNT[name]) == 4 - n
    for i, b in enumerate(blocks.names):  # KV-cache slots renumbered with the blocks
        for sub in m.get_submodule(b).modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                assert sub.layer_idx == i
    if hasattr(m, "generate"):
        prompt = inputs["input_ids"][:1, :5]
        cached = m.generate(prompt, max_new_tokens=4, do_sample=False)
        assert cached.shape == (1, 9)
        assert torch.equal(cached, m.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize("name,pipeline", [("llama_causal_lm", "drop_blocks(n=1,start=1)"),
                                           ("gpt2_lm_head", "replace_blocks(n=2,start=1)"),
                                           ("bert", "replace_blocks(n=2,start=1)"),
                                           ("t5_encoder", "replace_blocks(n=1,start=2,fold=false)")])
def test_depth_rewrites_round_trip_through_save_and_load(tmp_path, name, pipeline):
    model, inputs = hf_model(name, layers=4)
    res = go.optimize(model, inputs, pipeline, calib=_text_calib(model), measure=False, on_error="raise")
    go.save(res, tmp_path / "m")
    loaded = go.load(tmp_path / "m", hf_model(name, layers=4, seed=3)[0])
    assert torch.equal(_outputs(loaded, inputs), _outputs(res.model, inputs))
    assert any(e.op == "remove_items" for e in res.program.edits) == ("n=2" in pipeline or "drop" in pipeline)


def test_t5_linear_block_passes_the_position_bias_through():
    model, inputs = hf_model("t5_encoder", layers=4)
    res = go.optimize(model, inputs, "replace_blocks(n=1,start=2,fold=false)", calib=_text_calib(model),
                      measure=False, on_error="raise")
    block = res.model.encoder.block[2]
    assert isinstance(block, LinearBlock) and block.outputs[0] == "hidden" and block.outputs[1] == ["arg", 2]
    assert torch.isfinite(_outputs(res.model, inputs)).all()


def test_dropped_and_folded_models_reload_with_plain_transformers(tmp_path):
    for name, pipeline in [("llama_causal_lm", "drop_blocks(n=2)"), ("gpt2_lm_head", "replace_blocks(n=1,start=2)"),
                           ("qwen2_causal_lm", "replace_blocks(n=2,start=1)")]:
        model, inputs = hf_model(name, layers=4)
        res = go.optimize(model, inputs, pipeline, calib=_text_calib(model), measure=False, on_error="raise")
        write_for_reload(res.model, inputs, tmp_path / name)
    got = reload_with_transformers(tmp_path)
    assert got.pop("graphopt imported") is False
    assert set(got) == {"llama_causal_lm", "gpt2_lm_head", "qwen2_causal_lm"}
    for name, diff in got.items():
        assert isinstance(diff, float) and diff < 1e-5, (name, diff)


# --- bad input: one clear error, the model untouched -----------------------------------------------------

@pytest.mark.parametrize("pipeline,calib,message", [
    ("drop_blocks(n=4)", True, "n must leave at least one"),
    ("replace_blocks(n=2,start=3)", True, "start must be <= 2"),
    ("drop_blocks(n=1)", False, "needs calibration data"),
    ("replace_blocks(n=1,start=1)", False, "needs calibration data"),
])
def test_bad_depth_options_fail_clearly_and_leave_the_model(pipeline, calib, message):
    model, inputs = hf_model("llama_causal_lm", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _text_calib(model) if calib else None
    with pytest.raises((PassFailedError, ValueError), match=message):
        go.optimize(model, inputs, pipeline, calib=data, measure=False, on_error="raise")
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.warns(go.PassRolledBackWarning, match=message):
        res = go.optimize(model, inputs, pipeline, calib=data, measure=False)
        assert len(res.model.model.layers) == 4 and not res.ok


def test_empty_calibration_data_is_named_before_any_pass():
    from graphopt.frontend.inputs import InputError

    model, inputs = hf_model("llama_causal_lm", layers=4)
    with pytest.raises(InputError, match="calib is empty, and replace_blocks read calibration data"):
        go.optimize(model, inputs, "replace_blocks(n=1)", calib=[], measure=False)


def test_models_without_repeated_blocks_are_left_unchanged_and_special_blocks_are_refused_by_name():
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    res = go.optimize(mlp, torch.randn(2, 6), "drop_blocks(start=0)", measure=False, on_error="raise")
    row = res.report.passes[0]
    assert row.status == "unchanged" and len(list(res.model)) == 3
    assert any(d.level == "warning" and "nothing cut: Sequential has no repeated blocks" in d.message
               for d in row.diagnostics)
    with pytest.raises(PassFailedError, match="not a ModuleList of two or more blocks"):  # a path given: an error
        go.optimize(mlp, torch.randn(2, 6), "drop_blocks(start=0,blocks=layers)", measure=False, on_error="raise")
    t5, inputs = hf_model("t5_encoder", layers=4)
    with pytest.raises(PassFailedError, match="relative_attention_bias.*never cut"):
        go.optimize(t5, inputs, "drop_blocks(start=0)", measure=False, on_error="raise")
    res = go.optimize(t5, inputs, "drop_blocks(n=1)", calib=_text_calib(t5), measure=False, on_error="raise")
    notes = [d.message for d in res.report.records[-1].diagnostics if d.target == "encoder.block.0"]
    assert notes and "not a candidate" in notes[0] and res.report.records[-1].stats["start"] != 0


def test_compaction_keeps_edits_made_before_blocks_were_renumbered():
    edits = [Edit("replace_module", "layers.1.mlp", {"class": "x"}), Edit("remove_items", "layers", {"indices": [0]}),
             Edit("replace_module", "layers.1.mlp", {"class": "y"})]
    assert compact_edits(edits) == edits
    same = [Edit("replace_module", "layers.1.mlp", {"class": "x"}), Edit("replace_module", "layers.1.mlp", {})]
    assert compact_edits(same) == same[1:]


def test_heal_new_parameters_follow_the_renumbering_of_blocks():
    from graphopt.passes.heal.heal import new_parameter_names

    model, inputs = hf_model("bert", layers=4)
    calib = _text_calib(model)
    res = go.optimize(model, inputs, "replace_blocks(n=1,start=1),drop_blocks(n=1,start=0)", calib=calib,
                      measure=False, on_error="raise")
    assert isinstance(res.model.encoder.layer[0], LinearBlock)  # the LinearBlock was block 1, now block 0
    names = new_parameter_names(res.program)
    assert names == ["encoder.layer.0.linear.weight", "encoder.layer.0.linear.bias"]


class TappedStack(Stack):
    """A side head reads block ``tap``'s output (a feature pyramid's out_indices), besides the next block."""

    def __init__(self, tap: int = 1) -> None:
        super().__init__()
        self.tap = tap
        self.side = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, side = self.embed(x), None
        for i, b in enumerate(self.blocks):
            h = b(h)
            if i == self.tap:
                side = self.side(h)
        return self.head(torch.tanh(h)) + side


@pytest.mark.parametrize("pipeline", ["replace_blocks(n=2,start=1,fold=false)", "drop_blocks(n=1,start=0)"])
def test_a_cut_that_would_change_what_a_side_reader_sees_is_refused_with_the_reason(pipeline):
    """Replacing affine blocks 1-2 is exact on a plain stack, but a side head on block 1's output once got 0.37."""
    model = TappedStack().eval()
    calib = _calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassFailedError, match=r"blocks\.1 is read by more than blocks\.2.*side head"):
        go.optimize(model, calib[0], pipeline, calib=calib, measure=False, on_error="raise")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_spans_after_every_tap_stay_candidates_and_the_report_says_which_are_not():
    model = TappedStack(tap=1).eval()
    calib = _calib()
    res = go.optimize(model, calib[0], "replace_blocks(n=1,fold=false)", calib=calib, measure=False,
                      on_error="raise")
    rec = res.report.passes[0]
    assert rec.stats["start"] >= 2  # blocks 0 and 1 would move or remove the tapped output
    refused = {d.target for d in rec.diagnostics if "not a candidate" in d.message and "side head" in d.message}
    assert refused == {"blocks.0", "blocks.1"}
    x = _calib(2, seed=9)[0]
    with torch.no_grad():
        assert (res.model(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()  # still exact: affine blocks


def test_an_underdetermined_map_is_refused_with_the_data_it_needs():
    """An encoder-decoder's decoder with a few calibration tokens once fitted its map from fewer rows than its
    width and degenerated into repetition, reported ok."""
    model = Stack(width=12).eval()
    few = [torch.randn(1, 2, 6) for _ in range(3)]  # 6 token rows for a width of 12
    with pytest.raises(PassFailedError, match=r"from 6 token rows, fewer than the hidden width 12.*at least 12"):
        go.optimize(model, few[0], "replace_blocks(n=1,fold=false)", calib=few, measure=False, on_error="raise")


class _Stage(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv, self.skip = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + torch.relu(self.conv(x))


class _Stages(nn.Module):
    """A CNN whose stages run one after the other, the middle one widening 4 -> 8 channels."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_Stage(4, 4), _Stage(4, 8), _Stage(8, 8)])

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return x


def test_cnn_stages_are_cut_only_where_they_keep_the_shape_and_never_replaced_by_a_token_map():
    """A span must keep the hidden shape, and a linear map over the last dim of (batch, channels, H, W) would mix
    pixels: replace_blocks leaves a CNN unchanged and says why; drop_blocks cuts only a shape-keeping stage."""
    torch.manual_seed(0)
    model, calib = _Stages().eval(), [torch.randn(2, 4, 6, 6) for _ in range(3)]
    res = go.optimize(model, calib[0], "replace_blocks", calib=calib, measure=False, on_error="raise")
    assert res.report.passes[0].status == "unchanged"
    assert any("not (batch, tokens, features)" in d.message for d in res.report.passes[0].diagnostics)
    res = go.optimize(model, calib[0], "drop_blocks", calib=calib, measure=False, on_error="raise")
    notes = {d.target: d.message for d in res.report.passes[0].diagnostics}
    assert "takes hidden states of shape [2, 4, 6, 6] and gives [2, 8, 6, 6]" in notes["stages.1"]
    assert res.report.passes[0].status == "ok" and len(res.model.stages) == 2
    with torch.no_grad():
        assert res.model(calib[0]).shape == model(calib[0]).shape
    with pytest.raises(PassFailedError, match=r"drop_blocks\(start=1\): it takes hidden states of shape"):
        go.optimize(model, calib[0], "drop_blocks(start=1)", calib=calib, measure=False, on_error="raise")
