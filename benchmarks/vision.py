"""What graphopt's passes do to a real ImageNet CNN: EfficientNet-Lite0 (``load_model_spec("effnet-lite0")``),
side by side with Torch-Pruning and onnxruntime's quantizers.

    .venv/bin/python benchmarks/vision.py                       # every row (~25 min on 2 cores)
    .venv/bin/python benchmarks/vision.py --rows int8,ort-static --eval-views 64

Each row optimizes the original model and is measured against it on held-out photos (the ``eval`` split of
:mod:`graphopt.helpers.photos`: four photos none of the calibration photos is, ``--eval-views`` views of
them): top-1 and top-5 agreement with the original's top-1 class and the mean KL divergence of the class
distributions; parameters; MACs of one 224 x 224 image as a share of the original's (torch's FlopCounterMode,
FLOPs / 2); MiB of weights (torch: every parameter and buffer as held; onnxruntime rows: the file); latency at
batch 1 and 32 in PyTorch eager and in onnxruntime (CPU, ``--threads`` threads, medians of interleaved runs:
torch rows export to ONNX with graphopt, verified in onnxruntime); and the wall time of the optimization.

Peers, each with its documented recommended settings:

- Torch-Pruning (``pip install torch-pruning``; Fang et al., "DepGraph", CVPR 2023): ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)``, the classifier ignored, ``round_to=8``, one step, its pruning ratio
  searched (bisection) to the MACs graphopt's ``prune-0.7-r8`` row reaches; then the same ``heal`` as graphopt's row, toward the
  original model (Torch-Pruning runs as a user-written graphopt pass, ``bench_torch_pruning``, so that heal
  has the original as its teacher).
- onnxruntime's quantizers on the float export: ``quantize_dynamic`` (int8 weights per channel, activations
  quantized at run time; ``ConvInteger``) and ``quantize_static`` (QDQ, int8 per channel, activations
  calibrated with MinMax on the calibration views, after ``quant_pre_process``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import as_example_inputs
from graphopt.helpers.effnet import mean_kl, top_k_agreement, view_batches
from graphopt.infra.metrics import count_flops, count_params, count_weight_bytes
from graphopt.infra.text import markdown_table
from graphopt.models import load_model_spec
from graphopt.timing import interleaved_medians
from graphopt.units import MIB

#: graphopt rows: name -> pipeline
#: 70% of the MACs, the cut spread by Taylor importance across groups, each 1x1 reader refit on the calibration views
REC = ("fold_bn,prune(target_flops=0.7,round_to=8,importance=taylor,allocation=global,reconstruct=true,"
       "calib_batches=16)")
GRAPHOPT_ROWS = {
    "fold_bn": "fold_bn",
    "merge": "fold_bn,merge_layers",
    "channels-last": "fold_bn,channels_last",
    "merge-0.9": "merge_layers(latency=0.9)",
    "int8-rtn": "quantize(scheme=int8)",
    "int8": "quantize(scheme=int8,bias_correction=true)",
    "prune-0.7": "fold_bn,prune(target_flops=0.7)",
    "prune-0.7-r8": "fold_bn,prune(target_flops=0.7,round_to=8)",
    "prune-0.7-r8-heal": "fold_bn,prune(target_flops=0.7,round_to=8),heal",
    "prune-0.7-rec": REC,
    "prune-0.7-rec-heal": f"{REC},heal",
    # low-rank 1x1 convolutions (whitened); global spends the cut where the spectra fall fastest
    "factorize-0.1": "fold_bn,factorize(ratio=0.1)",
    "factorize-0.2-global": "fold_bn,factorize(ratio=0.2,allocation=global)",
    "factorize-0.2-global-heal": "fold_bn,factorize(ratio=0.2,allocation=global),heal",
}
#: peer rows: name -> what they run
PEER_ROWS = {
    "tp-0.7": "Torch-Pruning, MACs of prune-0.7",
    "tp-0.7-heal": "Torch-Pruning, MACs of prune-0.7, then heal",
    "ort-dynamic": "onnxruntime quantize_dynamic, int8 per channel",
    "ort-static": "onnxruntime quantize_static, QDQ int8 per channel, MinMax",
}


@dataclass
class Row:
    name: str
    method: str
    torch_model: nn.Module | None = None
    onnx_path: str | None = None
    seconds: float = 0.0
    macs: float | None = None


def macs(model: nn.Module, image: torch.Tensor) -> float:
    return (count_flops(model, as_example_inputs(image)) or 0) / 2


def torch_pruning(model: nn.Module, image: torch.Tensor, target_macs: float) -> tuple[nn.Module, float]:
    """Torch-Pruning at ``target_macs`` (its ratio bisected), with its README's recommended settings."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        tp.pruner.MetaPruner(m, image, importance=imp, pruning_ratio=ratio, ignored_layers=[m.classifier],
                             round_to=8).step()
        return m

    lo, hi = 0.0, 0.9
    best = model
    for _ in range(10):
        mid = (lo + hi) / 2
        m = pruned(mid)
        if macs(m, image) > target_macs:
            lo = mid
        else:
            hi, best = mid, m
    return best, hi


@go.register_pass("bench_torch_pruning", tolerance=None, change="prune")
def torch_pruning_pass(program: go.Program, am: object, *, ratio: float = 0.1) -> go.PassResult:
    """Torch-Pruning's MetaPruner at ``ratio`` on the program's model, in place (a user pass: for heal's teacher)."""
    import torch_pruning as tp

    model = program.module
    image = program.example_inputs.args[0][:1]
    tp.pruner.MetaPruner(model, image, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                         ignored_layers=[model.classifier], round_to=8).step()
    return go.PassResult(modified=True)


def ort_quantized(float_onnx: str, out: str, mode: str, calib: list[torch.Tensor]) -> str:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode == "dynamic":
        quantize_dynamic(float_onnx, out, weight_type=QuantType.QInt8, per_channel=True)
        return out
    pre = out + ".pre.onnx"
    quant_pre_process(float_onnx, pre)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            import onnxruntime as ort

            name = ort.InferenceSession(pre, providers=["CPUExecutionProvider"]).get_inputs()[0].name
            self.items = iter([{name: b.numpy()} for b in calib])

        def get_next(self):  # noqa: ANN201
            return next(self.items, None)

    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def session(path: str, threads: int):  # noqa: ANN201
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, images: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: b.numpy()})[0] for b in images.split(32)]
    return torch.from_numpy(np.concatenate(out))


def main(argv: list[str] | None = None) -> None:
    rows_all = {**GRAPHOPT_ROWS, **PEER_ROWS}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(rows_all), help=f"comma-separated rows of {', '.join(rows_all)}")
    ap.add_argument("--eval-views", type=int, default=128, help="held-out views (four photos)")
    ap.add_argument("--calib-views", type=int, default=256, help="calibration views (four other photos)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=5)
    args = ap.parse_args(argv)
    chosen = args.rows.split(",")
    unknown = [r for r in chosen if r not in rows_all]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(rows_all)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    loaded = load_model_spec("effnet-lite0")
    model = loaded.model.eval()
    held = torch.cat(view_batches("eval", args.eval_views, 32))
    calib = view_batches("calib", args.calib_views, 16)
    image = held[:1]
    with torch.no_grad():
        reference = torch.cat([model(b)["logits"] for b in held.split(32)])
    base_macs = macs(model, image)
    work = Path(tempfile.mkdtemp(prefix="graphopt-vision-"))

    rows = [Row("original", "-", model)]
    results: dict[str, go.OptimizeResult] = {}
    for name in [r for r in chosen if r in GRAPHOPT_ROWS]:
        start = time.perf_counter()
        results[name] = go.optimize(model, loaded.example_inputs, GRAPHOPT_ROWS[name], calib=calib, measure=False,
                                    on_error="raise")
        rows.append(Row(name, GRAPHOPT_ROWS[name], results[name].model, seconds=time.perf_counter() - start))
        print(f"{name}: optimized in {rows[-1].seconds:.0f} s", flush=True)
    if any(r.startswith("tp-") for r in chosen):
        target = macs(results["prune-0.7-r8"].model, image) if "prune-0.7-r8" in results else 0.7 * base_macs
        try:
            start = time.perf_counter()
            pruned, ratio = torch_pruning(model, image, target)
            seconds = time.perf_counter() - start
            if "tp-0.7" in chosen:
                rows.append(Row("tp-0.7", f"Torch-Pruning ratio {ratio:.3f}", pruned, seconds=seconds))
            if "tp-0.7-heal" in chosen:
                start = time.perf_counter()
                healed = go.optimize(model, loaded.example_inputs, f"bench_torch_pruning(ratio={ratio}),heal",
                                     calib=calib, measure=False, on_error="raise").model
                rows.append(Row("tp-0.7-heal", f"Torch-Pruning ratio {ratio:.3f}, heal", healed,
                                seconds=seconds + time.perf_counter() - start))
        except ImportError:
            print("(Torch-Pruning is not installed: its rows are left out; pip install torch-pruning)")
    for row in rows:
        row.macs = macs(row.torch_model, image) / base_macs
        row.onnx_path = str(work / f"{row.name}.onnx")
        go.export_onnx(row.torch_model, held[:2], row.onnx_path, dynamic_axes={"x": {0: "batch"}})
    for mode in ("dynamic", "static"):
        if f"ort-{mode}" in chosen:
            start = time.perf_counter()
            path = ort_quantized(rows[0].onnx_path, str(work / f"ort-{mode}.onnx"), mode, calib[:8])
            rows.append(Row(f"ort-{mode}", PEER_ROWS[f"ort-{mode}"], None, path, time.perf_counter() - start, 1.0))

    sessions = [session(r.onnx_path, args.threads) for r in rows]
    one, batch = held[:1], held[:32]
    torch_rows = [r for r in rows if r.torch_model is not None]
    with torch.no_grad():
        t1 = interleaved_medians([lambda m=r.torch_model: m(one) for r in torch_rows], args.latency_runs)
        t32 = interleaved_medians([lambda m=r.torch_model: m(batch) for r in torch_rows], args.latency_runs)
    name = sessions[0].get_inputs()[0].name
    o1 = interleaved_medians([lambda s=s: s.run(None, {name: one.numpy()}) for s in sessions], args.latency_runs)
    o32 = interleaved_medians([lambda s=s: s.run(None, {name: batch.numpy()}) for s in sessions], args.latency_runs)
    torch_ms = {r.name: (a, b) for r, a, b in zip(torch_rows, t1, t32)}

    table = []
    for row, sess, a, b in zip(rows, sessions, o1, o32):
        if row.torch_model is not None:
            with torch.no_grad():
                logits = torch.cat([row.torch_model(x)["logits"] for x in held.split(32)])
            params = f"{count_params(row.torch_model) / 1e6:.2f}"
            mib = f"{count_weight_bytes(row.torch_model) / MIB:.2f}"
            tb1, tb32 = (f"{1000 * t:.1f}" for t in torch_ms[row.name])
        else:
            logits = ort_logits(sess, held)
            params, mib, tb1, tb32 = "-", f"{Path(row.onnx_path).stat().st_size / MIB:.2f} (file)", "-", "-"
        table.append([row.name, row.method, f"{top_k_agreement(reference, logits):.4f}",
                      f"{top_k_agreement(reference, logits, 5):.4f}", f"{mean_kl(reference, logits):.4f}", params,
                      f"{row.macs:.3f}", mib, tb1, tb32, f"{1000 * a:.1f}", f"{1000 * b:.1f}",
                      f"{row.seconds:.0f}" if row.name != "original" else "-"])
    print(f"\nEfficientNet-Lite0 (ImageNet-1k); {args.eval_views} held-out views of 4 photos, {args.calib_views} "
          f"calibration views of 4 others; original {base_macs / 1e6:.0f} M MACs; {args.threads} threads\n")
    print(markdown_table(["row", "method", "top-1 agree", "top-5 agree", "KL", "params M", "MACs", "weights MiB",
                          "torch b1 ms", "torch b32 ms", "ORT b1 ms", "ORT b32 ms", "time s"], table))


if __name__ == "__main__":
    main()
