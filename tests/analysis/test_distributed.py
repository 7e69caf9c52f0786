"""Calibration under torch.distributed: two gloo processes on this machine, each with its share of the batches and
of GPTQ's layers, end with the statistics and the GPTQ codes of one process with all of them, and save once."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import graphopt as go
from graphopt.analysis import distributed
from graphopt.analysis.calibration import GramAccumulator, layer_input_stats
from graphopt.analysis.distributed import computed_by_owners, my_share, owners, rank_and_world
from graphopt.emit import save as save_module
from graphopt.passes.quantize import algorithms


class _TwoReaders(nn.Module):
    """Two layers that read one input (one GPTQ group, shared out over the processes), then a third."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(32, 64), nn.Linear(32, 48), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x)) + torch.relu(self.b(x)).sum(-1, keepdim=True))


def _model() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return _TwoReaders().eval(), [torch.randn(8, 32, generator=g) for _ in range(5)]  # (shares: 3 and 2 batches)


def _calibrate() -> dict[str, torch.Tensor]:
    """What the test compares: the Gram statistics of the layers, the GPTQ codes of a quantized copy, and the
    batches and GPTQ solves this process ran."""
    model, batches = _model()
    seen = []
    handle = model.a.register_forward_hook(lambda *_: seen.append(1))
    grams = layer_input_stats(model, {"a": model.a, "out": model.out}, batches, GramAccumulator)
    handle.remove()
    solves = []
    solve = algorithms.gptq_quantize
    algorithms.gptq_quantize = lambda *a, **k: solves.append(a[0].shape) or solve(*a, **k)
    try:
        res = go.optimize(model, batches[0], "quantize(scheme=int4,method=gptq)", calib=batches, measure=False,
                          on_error="raise")
    finally:
        algorithms.gptq_quantize = solve
    return {"gram_a": grams["a"].gram, "gram_out": grams["out"].gram, "rows": torch.tensor(grams["out"].rows),
            "batches_run": torch.tensor(len(seen)), "solved": torch.tensor([s[0] for s in solves]),
            **{f"codes_{n}": getattr(res.model, n).qweight for n in ("a", "b", "out")}, "result": res}


def _meet(item: int, folder: str) -> int:
    """Item 1 (rank 1's) leaves a mark; item 0 (rank 0's) waits for it: both are done only if the owners compute
    at once (-1: item 0 waited 20 s in vain)."""
    mark = Path(folder) / "item1"
    if item == 1:
        mark.touch()
        return 1
    deadline = time.monotonic() + 20
    while not mark.exists():
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.01)
    return 0


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world) and my_share(range(5)) == list(range(5))[rank::world]
        figures = _calibrate()
        writes = []
        write = save_module._write_atomic
        save_module._write_atomic = lambda path, fn: writes.append(path) or write(path, fn)
        out = go.save(figures.pop("result"), f"{folder}/saved")
        save_module._write_atomic = write
        figures["writes"] = torch.tensor(len(writes))
        figures["saved_there"] = torch.tensor((out / "graphopt.json").exists())  # after rank 0's save, in each
        figures["at_once"] = torch.tensor(computed_by_owners([2.0, 1.0], lambda i: _meet(i, folder)) == [0, 1])
        torch.save(figures, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_calibrate_as_one_process_does(tmp_path):
    assert rank_and_world() == (0, 1) and my_share([1, 2, 3]) == [1, 2, 3]  # no process group: all of it
    context = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two calibration processes did not finish in 120 s")
    alone = _calibrate()
    loaded = go.load(tmp_path / "saved", _model()[0])  # what the two processes saved, once
    assert torch.equal(loaded.a.qweight, alone["codes_a"])
    assert int(alone["batches_run"]) == 5 and sorted(alone["solved"].tolist()) == [32, 48, 64]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # each layer solved by one process: the group (a: 64 rows, b: 48) split, the costlier out and a apart
    assert sorted(ranks[0]["solved"].tolist() + ranks[1]["solved"].tolist()) == [32, 48, 64]
    assert all(len(got["solved"]) < 3 for got in ranks)
    assert [int(got["writes"]) for got in ranks] == [2, 0] and all(bool(got["saved_there"]) for got in ranks)
    assert all(bool(got["at_once"]) for got in ranks)  # the owners computed their items at the same time
    for got, share in zip(ranks, (3, 2)):
        assert int(got["batches_run"]) == share  # each process ran its share of the batches only
        assert int(got["rows"]) == int(alone["rows"]) == 40  # every batch's rows, in each process
        for key in ("gram_a", "gram_out"):
            torch.testing.assert_close(got[key], alone[key], rtol=1e-12, atol=1e-9)
        for key in ("codes_a", "codes_b", "codes_out"):
            assert torch.equal(got[key], alone[key]), key


def test_owners_share_the_costliest_items_first_and_one_process_owns_all(monkeypatch):
    assert owners([5.0, 1.0, 4.0]) == [0, 0, 0]
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    assert owners([5.0, 1.0, 4.0]) == [0, 1, 1]  # 5 to rank 0, 4 to rank 1, then 1 to the less loaded rank 1
    assert owners([1.0, 1.0, 1.0, 1.0]) == [0, 1, 0, 1]
