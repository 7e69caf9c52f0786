"""Peak memory and wall time per pass on Llama-shaped models held in memory, and GPTQ with 1 and 2 processes.

    .venv/bin/python benchmarks/scale.py --no-processes                # 0.5B and 1B shapes, ~25 min on 2 cores
    .venv/bin/python benchmarks/scale.py --shapes 0.5b --layers 8 --no-passes  # GPTQ, 1 vs 2 processes, ~6 min

Issue 30's measurements that this machine can make today (docs/scale.md). Models are LlamaForCausalLM with random
weights in float32: ``0.5b`` (Qwen2.5-0.5B's sizes: hidden 896, MLP 4864, 24 layers, GQA 14/2, vocabulary
151936) and ``1b`` (Llama-3.2-1B's: hidden 2048, MLP 8192, 16 layers, GQA 32/8, vocabulary 128256). Calibration:
``--calib`` random token sequences of ``--tokens``.

- Per pass (``quantize(scheme=int4,method=gptq)``, ``replace_blocks(n=2)``), one ``optimize`` call each in a
  fresh process: the pass's seconds, its peak memory above the level it started from (``go.PassMemory``: the
  process's resident memory, sampled), and the process's peak resident memory over the whole call (the model,
  ``optimize``'s copy of it, the rollback snapshot and the pass's own work).
- Streamed (``--streamed``): the same model saved as an HF folder (float32 safetensors, under ``--folder``), then
  ``graphopt.stream.optimize_streamed`` in a fresh process (one block's weights in memory at a time): its wall
  time, its peak memory above its start, the process's peak, and whether its int4 codes equal the in-memory run's
  (read back from the written file), or for ``replace_blocks`` every tensor of the blocks.
- GPTQ with 1 process (2 threads) and with 2 processes under ``torchrun`` (gloo, 1 thread each; calibration
  batches and each group's layers shared out, docs/scale.md): wall time of the ``optimize`` call in rank 0,
  and whether the codes equal the 1-process run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

SHAPES = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
}
PASSES = ("quantize(scheme=int4,method=gptq)", "replace_blocks(n=2)")
GPTQ = PASSES[0]


def build(shape: str, layers: int | None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**sizes)).eval()


def run_one(args: argparse.Namespace) -> dict:
    """One optimize call in this process (or, under torchrun, in each): its figures as a dict."""
    import graphopt as go
    from graphopt.analysis.distributed import rank_and_world

    model = build(args.shape, args.layers)
    calib = calibration(model.config.vocab_size, args.calib, args.tokens)
    start = time.perf_counter()
    res = go.optimize(model, calib[0], args.pass_text, calib=calib, measure=False, on_error="raise",
                      instruments=[go.PassMemory()])
    wall = time.perf_counter() - start
    record = res.report.records[-1]
    return {"params_b": sum(p.numel() for p in model.parameters()) / 1e9, "pass_s": record.seconds,
            "pass_peak_mib": record.measures.get("peak MiB"), "wall_s": wall, "world": rank_and_world()[1],
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "codes": codes_digest(res.model.state_dict().items())}


def calibration(vocab: int, n: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (1, tokens), generator=g)} for _ in range(n)]


def codes_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One hash of the int4 / int8 codes (``qweight``) by name, or, for a model with none (``replace_blocks``), of
    every tensor of its blocks (``.layers.``)."""
    tensors = list(tensors)
    chosen = [(n, t) for n, t in tensors if n.endswith("qweight")] or [(n, t) for n, t in tensors if ".layers." in n]
    digest = hashlib.sha256()
    for name, t in sorted(chosen, key=lambda nt: nt[0]):
        digest.update(name.encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_folder(args: argparse.Namespace) -> dict:
    """The model of ``--shape`` / ``--layers`` saved as an HF folder (float32 safetensors) at ``--folder``."""
    build(args.shape, args.layers).save_pretrained(args.folder)
    return {"saved": args.folder}


def run_streamed(args: argparse.Namespace) -> dict:
    """``optimize_streamed`` on the folder; codes read back one tensor at a time once the peak is taken."""
    from safetensors import safe_open

    from graphopt.stream import StreamError, optimize_streamed

    config = json.loads((Path(args.folder) / "config.json").read_text())
    calib = calibration(config["vocab_size"], args.calib, args.tokens)
    out = Path(args.folder).with_name(Path(args.folder).name + "-out")
    try:
        res = optimize_streamed(args.folder, calib[0], args.pass_text, calib=calib, out=out)
    except StreamError as e:
        return {"refused": " ".join(str(e).split())}
    figures = {"wall_s": res.seconds, "pass_peak_mib": res.peak_mib, "process_peak_mib": res.process_peak_mib,
               "params_b": None}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = [n for n in f.keys() if n.endswith("qweight")] or [n for n in f.keys() if ".layers." in n]  # noqa: SIM118
        figures["codes"] = codes_digest((n, f.get_tensor(n)) for n in names)
    return figures


def worker(args: argparse.Namespace) -> None:
    """Run one optimize call and print its figures as one JSON line (rank 0 only under torchrun)."""
    import torch.distributed as dist

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    try:
        figures = {"save": save_folder, "streamed": run_streamed}.get(args.mode, run_one)(args)
        if not distributed or dist.get_rank() == 0:
            print("RESULT " + json.dumps(figures), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


def launch(shape: str, layers: int | None, pass_text: str, calib: int, tokens: int, processes: int = 1,
           mode: str = "memory", folder: str = "") -> dict:
    """``worker`` in a fresh process (or ``processes`` of them under torchrun), its JSON line parsed."""
    me = [str(Path(__file__).resolve()), "--worker", "--shape", shape, "--pass-text", pass_text,
          "--calib", str(calib), "--tokens", str(tokens), "--threads", str(2 // processes), "--mode", mode,
          *(["--folder", folder] if folder else []), *(["--layers", str(layers)] if layers else [])]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    out = subprocess.run(prefix + me, capture_output=True, text=True, timeout=3600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{pass_text} on {shape} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.5b,1b")
    ap.add_argument("--layers", type=int, default=0, help="override the shapes' layer counts (0: keep)")
    ap.add_argument("--calib", type=int, default=16, help="sequences (replace_blocks needs rows >= the hidden width)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--passes", action=argparse.BooleanOptionalAction, default=True,
                    help="the per-pass rows (peak memory and time)")
    ap.add_argument("--processes", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ with 1 and 2 processes (the first shape only)")
    ap.add_argument("--only", default="", help="run only the passes whose text starts with this (replace_blocks)")
    ap.add_argument("--streamed", action=argparse.BooleanOptionalAction, default=True,
                    help="each pass streamed from an HF folder too, beside the in-memory row")
    ap.add_argument("--folder", default="/tmp/graphopt-scale", help="where the HF folders of the shapes are saved")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--pass-text", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.worker:
        worker(args)
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    layers = args.layers or None
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; calibration {args.calib} x {args.tokens} tokens")
    if args.passes:
        print("| shape | params B | pass | run | pass s | pass peak MiB (above its start) | process peak MiB | "
              "codes equal in-memory |")
        print("|---|---|---|---|---|---|---|---|")
    for shape in shapes if args.passes else []:
        folder = f"{args.folder}/{shape}-{layers or 'all'}"
        if args.streamed and not Path(folder, "config.json").is_file():
            launch(shape, layers, "", args.calib, args.tokens, mode="save", folder=folder)
        for text in (t for t in PASSES if t.startswith(args.only)):
            f = launch(shape, layers, text, args.calib, args.tokens)
            print(f"| {shape} | {f['params_b']:.2f} | {text} | in memory | {f['pass_s']:.1f} | "
                  f"{f['pass_peak_mib']:.0f} | {f['process_peak_mib']:.0f} | |", flush=True)
            if not args.streamed:
                continue
            s = launch(shape, layers, text, args.calib, args.tokens, mode="streamed", folder=folder)
            if "refused" in s:
                print(f"| {shape} | {f['params_b']:.2f} | {text} | streamed: refused ({s['refused']}) | | | | |",
                      flush=True)
                continue
            same = "yes" if s["codes"] == f["codes"] else "NO"
            print(f"| {shape} | {f['params_b']:.2f} | {text} | streamed | {s['wall_s']:.1f} | "
                  f"{s['pass_peak_mib']:.0f} | {s['process_peak_mib']:.0f} | {same} |", flush=True)
    if args.processes:
        shape = shapes[0]
        print(f"\nGPTQ ({GPTQ}) on {shape}, one process vs two under torchrun (gloo), 2 cores in all:\n")
        print("| processes x threads | optimize wall s | GPTQ pass s | codes equal one process's |")
        print("|---|---|---|---|")
        one = launch(shape, layers, GPTQ, args.calib, args.tokens, processes=1)
        two = launch(shape, layers, GPTQ, args.calib, args.tokens, processes=2)
        for label, f in (("1 x 2", one), ("2 x 1", two)):
            print(f"| {label} | {f['wall_s']:.1f} | {f['pass_s']:.1f} | "
                  f"{'yes' if f['codes'] == one['codes'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
