"""remove_dropout: Before (Dropout modules) -> Expected (nn.Identity, bit-identical eval outputs)."""

import pytest
import torch
from torch import nn

import graphopt as go
from graphopt.analysis.hf_config import DROPOUTS as _DROPOUTS
from graphopt.helpers.zoo import hf_model


def dropouts(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, _DROPOUTS)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop2d = nn.Dropout2d(0.3)
        self.block = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.AlphaDropout(0.1))
        self.head = nn.Linear(8, 2)
        self.head_drop = nn.Dropout(0.2)

    def forward(self, x):
        y = self.drop2d(self.conv(x)).mean((2, 3))
        return self.head_drop(self.head(self.block(y)))


def remove(model: nn.Module, inputs, pipeline: str = "remove_dropout") -> go.OptimizeResult:
    return go.optimize(model, inputs, pipeline, measure=False)


def test_own_model_all_removed_exactly():
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    res = remove(model, x)
    record = res.report.passes[0]
    assert record.status == "ok" and record.stats == {"removed": 4}
    assert dropouts(res.model) == []
    assert isinstance(res.model.block[1], nn.Identity) and isinstance(res.model.drop2d, nn.Identity)
    fresh = torch.randn(5, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(res.model(fresh), model(fresh))  # eval-mode dropout is the identity: bit-exact
    assert record.step_rel_err == 0.0
    assert [(e.op, e.target) for e in res.program.edits if e.op == "replace_module"] == [
        ("replace_module", n) for n in ("drop2d", "block.1", "block.3", "head_drop")]
    assert len(dropouts(model)) == 4  # the caller's model keeps its dropouts


@pytest.mark.parametrize("where, left", [("block.*", {"drop2d", "head_drop"}),
                                         ("*drop*", {"block.1", "block.3"}),
                                         ("nothing", {"drop2d", "block.1", "block.3", "head_drop"})])
def test_where_glob(where, left):
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    res = remove(model, x, f"remove_dropout(where='{where}')")
    assert set(dropouts(res.model)) == left
    assert res.report.passes[0].stats == {"removed": 4 - len(left)}
    assert res.report.passes[0].status == ("unchanged" if len(left) == 4 else "ok")


def test_shared_dropout_is_removed_under_every_name():
    model = Net().eval()
    model.head_drop = model.block[1]  # one Dropout object, two names
    res = remove(model, torch.randn(2, 3, 6, 6))
    assert dropouts(res.model) == []


def test_root_dropout_is_reported_not_crashed():
    program = go.capture(nn.Dropout(0.5).eval(), torch.randn(3, 4))
    result = go.get_pass("remove_dropout")().run(program, program.analyses)
    assert not result.modified and result.diagnostics[0].level == "skipped"


def test_hf_bert():
    model, inputs = hf_model("bert")
    names = dropouts(model)
    assert len(names) == 7  # embeddings + (self-attention, attention output, FFN output) x 2 layers
    res = remove(model, inputs)
    assert res.report.passes[0].stats == {"removed": len(names)}
    assert dropouts(res.model) == [] and type(res.model) is type(model)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        got = res.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # BERT reads ``self.dropout.p`` in training mode: the optimised model must still train (with no dropout).
    res.model.train()
    with torch.no_grad():
        trained = res.model(**inputs).last_hidden_state
    torch.testing.assert_close(trained, want, rtol=1e-6, atol=1e-6)


def test_hf_bert_where_scopes_to_encoder():
    model, inputs = hf_model("bert")
    res = remove(model, inputs, "remove_dropout(where='encoder.layer.1.*')")
    assert res.report.passes[0].stats == {"removed": 3}
    assert "embeddings.dropout" in dropouts(res.model)
    assert not any(n.startswith("encoder.layer.1.") for n in dropouts(res.model))
    assert len(dropouts(res.model)) == 4


def test_the_default_preset_on_a_model_with_nothing_to_do_says_why_at_info_level():
    """The README's first snippet once warned 'fold_bn changed nothing and gave no reason'."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    res = go.optimize(model, torch.randn(3, 4), "default", measure=False, on_error="raise")
    for record, why in zip(res.report.passes, ("no Dropout layers in the model", "no BatchNorm layers in the model")):
        assert record.status == "unchanged"
        assert [(d.level, d.message.split(":")[0]) for d in record.diagnostics] == [("info", why)], record.diagnostics
