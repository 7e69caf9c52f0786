"""Calibration under torch.distributed: two gloo processes on this machine, each with half the batches, end with
the statistics and the GPTQ codes of one process with all of them."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import graphopt as go
from graphopt.analysis.calibration import GramAccumulator, layer_input_stats
from graphopt.analysis.distributed import my_share, rank_and_world


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 32, generator=g) for _ in range(5)]  # (5: the shares are 3 and 2 batches)


def _calibrate() -> dict[str, torch.Tensor]:
    """What the test compares: the Gram statistics of both layers and the GPTQ codes of a quantized copy."""
    model, batches = _mlp()
    seen = []
    handle = model[0].register_forward_hook(lambda *_: seen.append(1))
    grams = layer_input_stats(model, {"0": model[0], "2": model[2]}, batches, GramAccumulator)
    handle.remove()
    res = go.optimize(model, batches[0], "quantize(scheme=int4,method=gptq)", calib=batches, measure=False,
                      on_error="raise")
    return {"gram0": grams["0"].gram, "gram2": grams["2"].gram, "rows": torch.tensor(grams["2"].rows),
            "batches_run": torch.tensor(len(seen)),
            "codes0": res.model[0].qweight, "codes2": res.model[2].qweight}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world) and my_share(range(5)) == list(range(5))[rank::world]
        torch.save(_calibrate(), f"{folder}/rank{rank}.pt")
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
    assert int(alone["batches_run"]) == 5
    for rank, share in enumerate((3, 2)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert int(got["batches_run"]) == share  # each process ran its share of the batches only
        assert int(got["rows"]) == int(alone["rows"]) == 40  # every batch's rows, in each process
        for key in ("gram0", "gram2"):
            torch.testing.assert_close(got[key], alone[key], rtol=1e-12, atol=1e-9)
        for key in ("codes0", "codes2"):
            assert torch.equal(got[key], alone[key]), f"{key} differs in rank {rank}"
