"""The pass manager's measurements are instruments (issue 25): the hooks run in order, a user's own
instrument adds a report column, one that raises is noted and fails nothing, PassMemory sees a pass's peak."""

import os
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphopt as go


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()


@dataclass
class Allocates(go.Pass):
    """Holds ``mib`` MiB of touched memory while it runs, changes nothing."""

    name = "allocates"
    mib: int = 0

    def run(self, program, am):
        held = torch.ones(self.mib * 2**18) if self.mib else None  # 4-byte floats, every page written
        time.sleep(0.1)  # held for many of the sampler's 5 ms ticks
        del held
        return go.PassResult(False).note("", "allocated and let go")


class Log(go.Instrument):
    name = "log"

    def __init__(self):
        self.calls = []

    def run_begins(self, program):
        self.calls.append("begins")

    def before_pass(self, program, p):
        self.calls.append(f"before {p.name}")

    def after_pass(self, record, program):
        self.calls.append(f"after {record.name}")

    def measure(self, record, seen):
        self.calls.append(f"measure {record.name}")
        record.measures["dropouts"] = float(sum(isinstance(m, nn.Dropout) for m in seen.program.module.modules()))

    def run_ends(self, report, program):
        self.calls.append("ends")


def test_the_hooks_run_in_order_and_a_measure_becomes_a_column():
    log = Log()
    res = go.optimize(_mlp(), torch.randn(4, 16), "remove_dropout,fold_bn", measure=False, instruments=[log],
                      on_error="raise")
    assert log.calls == ["begins", "measure original", "before remove_dropout", "after remove_dropout",
                         "measure remove_dropout", "before fold_bn", "after fold_bn", "measure fold_bn", "ends"]
    assert [r.measures["dropouts"] for r in res.report.records] == [1.0, 0.0, 0.0]  # measured after each pass
    header = next(line for line in str(res.report).splitlines() if line.startswith("pass "))
    assert header.rstrip().endswith("dropouts")
    assert res.report.to_dict()["records"][1]["measures"] == {"dropouts": 0.0}


def test_an_instrument_that_raises_is_noted_and_fails_no_pass():
    class Broken(go.Instrument):
        name = "broken"

        def measure(self, record, seen):
            raise RuntimeError("sensor unplugged")

    res = go.optimize(_mlp(), torch.randn(4, 16), "remove_dropout", measure=False, instruments=[Broken()],
                      on_error="raise")
    assert res.ok and res.report.passes[0].status == "ok"
    assert any("instrument 'broken' failed in measure: RuntimeError: sensor unplugged" in n for n in res.report.notes)


def test_instruments_must_be_instruments():
    with pytest.raises(TypeError, match="go.Instrument objects"):
        go.optimize(_mlp(), torch.randn(4, 16), "remove_dropout", instruments=[object()])


def test_the_standard_columns_are_instruments_that_measure_selects():
    manager = go.PassManager(go.parse_pipeline("remove_dropout"), measure=go.Measure(flops=False, latency=False))
    assert [type(i).__name__ for i in manager.instruments] == ["Size", "OutputError", "Quality"]
    res = go.optimize(_mlp(), torch.randn(4, 16), "remove_dropout", measure=go.Measure(flops=False, latency=False))
    row = res.report.passes[0]
    assert row.params is not None and row.flops is None and row.latency_ms is None and row.cosine == pytest.approx(1.0)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc (Linux)")
def test_pass_memory_sees_what_a_pass_allocates():
    pipeline = [Allocates(mib=0), Allocates(mib=256)]
    res = go.optimize(_mlp(), torch.randn(4, 16), pipeline, measure=False, instruments=[go.PassMemory()])
    idle, busy = (r.measures["peak MiB"] for r in res.report.passes)
    assert busy > 200 and idle < 64, (idle, busy)
    assert "peak MiB" not in res.report.records[0].measures  # the original's row ran no pass


class _Packed(torch.Tensor):
    """A weight presented as float32 and held as int8 codes and per-row scales (how torchao's and
    optimum-quanto's quantized weights are built)."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_weight_bytes_count_what_a_tensor_subclass_holds():
    from graphopt.infra.metrics import count_weight_bytes

    layer = torch.nn.Linear(64, 32, bias=False)
    assert count_weight_bytes(layer) == 64 * 32 * 4
    del layer.weight
    layer.register_buffer("weight", _Packed(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 1)))
    assert count_weight_bytes(layer) == 64 * 32 + 32 * 4  # the codes and the scales, not 32 x 64 float32
