"""Zero-configuration structural pruning: graphopt vs Torch-Pruning on the zoo, and all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/prune_zoo.py                     # zoo table + MiniLM figure, 2 threads
    .venv/bin/python benchmarks/prune_zoo.py --models bert,llama,opt --no-minilm
    .venv/bin/python benchmarks/prune_zoo.py --no-zoo --eval-texts 1024 --heal-steps 400

**Zoo table.** Every model of :data:`graphopt.helpers.zoo.ZOO` plus a few architectures built here from
configs (OPT, Phi-3, Gemma with one KV head, Falcon, BLOOM, EfficientNet, RegNet) is pruned by
graphopt (``prune(ratio=R)``) and by Torch-Pruning with zero configuration (``MetaPruner``,
``MagnitudeImportance(p=2)``, ``pruning_ratio=R``, the example inputs and nothing else), each on its
own deep copy. Per tool: did it produce a model that runs, the share of parameters kept, the analysis
time (model -> groups: graphopt's torch.export capture plus dimension propagation; Torch-Pruning's
``MetaPruner`` construction: tracing plus group enumeration), whether every output keeps its shape,
and whether attention heads stay intact. "Runs" is not enough: a cut inside heads can leave a model
that runs and is wrong, so the head check is

1. widths: after pruning at R, every q/k/v projection is a whole number of heads of the original
   head size (and the query heads a multiple of the KV heads);
2. dead heads: on another copy, the same KV-head groups of every attention layer are made exactly
   dead (their q/k/v rows and biases, output-projection columns and relative-position-bias columns
   set to zero); both tools then prune the attention projections only (graphopt ``where=*[aA]tt*``,
   Torch-Pruning ``ignored_layers`` = every other layer; no head counts given) at the dead fraction
   with L2 magnitude. Removing dead heads is exact, so the outputs must equal the unpruned zeroed
   model's (relative error < 1e-4); a tool that cuts across heads or mismatches q/k/v/o fails.

A cell that raises or exceeds ``--timeout`` seconds shows FAIL with the reason in the notes below
the table.

**MiniLM figure.** The embedded all-MiniLM-L6-v2 is pruned until its encoder has 30% fewer
parameters (the word embeddings are most of the rest; their vocabulary dim and the hidden size
reach the outputs, so they stay: the target on the whole model is computed from the encoder's
share), by L2 and by Taylor importance, and with ``heal`` (distillation from the original on the
calibration split) when that pass is registered. Printed: the cosine of mean-pooled sentence
embeddings to the original's on held-out text (standard-library docstrings, split disjoint from
calibration), the share of sentences whose nearest neighbour is unchanged, and the CPU latency of
the original and pruned models measured interleaved in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import platform
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import graphopt as go
from graphopt.frontend.inputs import flatten_outputs
from graphopt.helpers.hf_reload import reload_with_transformers, write_for_reload
from graphopt.helpers.quality import sentence_embeddings
from graphopt.helpers.zoo import ZOO, hf_model
from graphopt.infra.text import markdown_table
from graphopt.timing import interleaved_medians

ATTENTION_GLOB = "*[aA]tt*"  # every HF attention module name has "att"/"Att" in it (attn, attention, SelfAttention)
EXACT = 1e-4  # relative output error under which pruning dead heads counts as exact


# --- models ---------------------------------------------------------------------------------------

def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(ZOO)}")
    return hf_model(name)


# --- attention layers, found by the names HF gives them ---------------------------------------------

_SEPARATE = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
             ("q", "k", "v"))
_OUT = ("o_proj", "out_proj", "out_lin", "o", "dense")
_FUSED = (("c_attn", "c_proj"), ("qkv_proj", "o_proj"), ("query_key_value", "dense"))


@dataclass
class Attention:
    """One attention layer: where its projections are and how their output rows map to heads."""

    name: str
    layout: str  # separate | concat ([q | k | v] in one layer) | interleaved ([q k v] per head) | grouped
    #             ([q.. k v] per KV head)
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_q: int
    n_kv: int


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _out_axis(layer: nn.Module) -> int:
    return 1 if type(layer).__name__ == "Conv1D" else 0  # transformers' Conv1D stores (in, out)


def out_width(layer: nn.Module) -> int:
    return int(layer.weight.shape[_out_axis(layer)])


def in_width(layer: nn.Module) -> int:
    return int(layer.weight.shape[1 - _out_axis(layer)])


def _head_dim(module: nn.Module, q_width: int, config: Any) -> int:
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return q_width // value
    return int(getattr(config, "head_dim", 0) or config.hidden_size // config.num_attention_heads)


def find_attention(model: nn.Module) -> list[Attention]:
    """Attention layers of an HF model (separate or fused q/k/v projections)."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    found = []
    for name, module in modules.items():
        kids = dict(module.named_children())
        for trio in _SEPARATE:
            if not all(k in kids for k in trio):
                continue
            q, k, v = (_join(name, n) for n in trio)
            o = next((_join(name, n) for n in _OUT if n in kids), _join(name.rpartition(".")[0], "output.dense"))
            if o not in modules:
                continue
            hd = _head_dim(module, out_width(modules[q]), config)
            found.append(Attention(name, "separate", q, k, v, o, hd, out_width(modules[q]) // hd,
                                   out_width(modules[k]) // hd))
        for fused, out in _FUSED:
            if fused in kids and out in kids:
                qkv, o = _join(name, fused), _join(name, out)
                width, q_width = out_width(modules[qkv]), in_width(modules[o])
                hd = _head_dim(module, q_width, config)
                n_q = q_width // hd
                n_kv = (width - q_width) // (2 * hd)
                if getattr(module, "new_decoder_architecture", False):
                    layout = "grouped"  # Falcon-40B style: view(..., kv heads, group + 2, head_dim)
                elif fused == "query_key_value" and not getattr(module, "multi_query", False):
                    layout = "interleaved"  # BLOOM, Falcon-RW: view(..., heads, 3, head_dim)
                else:
                    layout = "concat"
                found.append(Attention(name, layout, qkv, qkv, qkv, o, hd, n_q, n_kv))
    return found


def head_rows(a: Attention, kv_groups: list[int]) -> tuple[dict[str, list[int]], list[int]]:
    """Output rows of the q/k/v layers that belong to ``kv_groups``, and the query heads those hold."""
    hd, g = a.head_dim, a.n_q // a.n_kv
    heads = [j * g + i for j in kv_groups for i in range(g)]
    q = [h * hd + d for h in heads for d in range(hd)]
    kv = [j * hd + d for j in kv_groups for d in range(hd)]
    if a.layout == "separate":
        return {a.q: q, a.k: kv, a.v: kv}, heads
    if a.layout == "concat":
        k_at, v_at = a.n_q * hd, a.n_q * hd + a.n_kv * hd
        return {a.q: q + [k_at + i for i in kv] + [v_at + i for i in kv]}, heads
    if a.layout == "grouped":
        return {a.q: [j * (g + 2) * hd + i for j in kv_groups for i in range((g + 2) * hd)]}, heads
    return {a.q: [h * 3 * hd + i for h in heads for i in range(3 * hd)]}, heads  # interleaved


def head_shapes(model: nn.Module, layers: list[Attention]) -> list[tuple[int, int]]:
    """(head_dim, query width) of each attention layer of ``model`` (pruned), head_dim as its module holds it."""
    modules, config = dict(model.named_modules()), getattr(model, "config", None)
    return [(_head_dim(modules[a.name], in_width(modules[a.o]), config), in_width(modules[a.o])) for a in layers]


def width_problem(model: nn.Module, layers: list[Attention]) -> str:
    """'' when every attention layer of ``model`` (pruned) holds whole heads, else what is wrong.

    The head size is the one the pruned module uses (a tool may shrink every head alike)."""
    modules = dict(model.named_modules())
    for a, (hd, o_in) in zip(layers, head_shapes(model, layers)):
        if a.layout == "separate":
            q, k, v = (out_width(modules[n]) for n in (a.q, a.k, a.v))
            if q % hd or k % hd or v % hd:
                return f"{a.name}: q/k/v widths {q}/{k}/{v}, head_dim {hd}"
            if k != v or (q // hd) % (k // hd) or o_in != q:
                return f"{a.name}: q/k/v/o widths {q}/{k}/{v}/{o_in} inconsistent"
        else:
            w = out_width(modules[a.q])
            kv2 = w - o_in
            if o_in % hd or kv2 % (2 * hd) or (o_in // hd) % max(1, kv2 // (2 * hd)):
                return f"{a.name}: fused qkv width {w}, o input {o_in}, head_dim {hd}"
    return ""


def heads_cut(model: nn.Module, layers: list[Attention]) -> tuple[bool, str]:
    """Whether ``model`` (pruned) lost heads, and a note when its head size changed."""
    shapes = head_shapes(model, layers)
    lost = any(q // hd < a.n_q for a, (hd, q) in zip(layers, shapes))
    sizes = sorted({(a.head_dim, hd) for a, (hd, _) in zip(layers, shapes) if hd != a.head_dim})
    return lost, ", ".join(f"{old}->{new}" for old, new in sizes)


@torch.no_grad()
def kill_heads(model: nn.Module, layers: list[Attention], fraction: float) -> None:
    """Make the same KV-head groups of every attention layer exactly dead (in place)."""
    modules = dict(model.named_modules())
    for a in layers:
        n_dead = max(1, round(a.n_kv * fraction))
        step = a.n_kv // n_dead
        groups = [i * step + step // 2 for i in range(n_dead)]
        rows, heads = head_rows(a, groups)
        for name, idx in rows.items():
            layer = modules[name]
            layer.weight.index_fill_(_out_axis(layer), torch.tensor(idx), 0.0)
            if getattr(layer, "bias", None) is not None:
                layer.bias[idx] = 0.0
        o = modules[a.o]
        cols = torch.tensor([h * a.head_dim + d for h in heads for d in range(a.head_dim)])
        o.weight.index_fill_(1 - _out_axis(o), cols, 0.0)
        for pname, p in modules[a.name].named_parameters():  # relative position biases per head (T5, Swin)
            if "relative" in pname and p.dim() >= 1 and p.shape[-1] == a.n_q:
                p[..., heads] = 0.0


# --- the two tools ------------------------------------------------------------------------------------

class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CellTimeout after ``seconds`` (SIGALRM: Unix, main thread)."""
    def fire(signum: int, frame: Any) -> None:
        raise CellTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def graphopt_analysis(model: nn.Module, inputs: dict) -> float:
    start = time.perf_counter()
    go.capture(copy.deepcopy(model), inputs).dependency_graph  # noqa: B018  (builds the graph)
    return time.perf_counter() - start


def graphopt_prune(model: nn.Module, inputs: dict, ratio: float, attention_only: bool = False) -> nn.Module:
    prune = go.get_pass("prune")(ratio=ratio, importance="l2", where=ATTENTION_GLOB if attention_only else "*")
    return go.optimize(copy.deepcopy(model), inputs, [prune], measure=False, on_error="raise").model


def tp_prune(model: nn.Module, inputs: dict, ratio: float, attention_only: list[Attention] | None = None
             ) -> tuple[nn.Module, float]:
    """Torch-Pruning, zero configuration (with ``attention_only``: every non-q/k/v layer ignored)."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = None
    if attention_only is not None:
        keep = {n for a in attention_only for n in (a.q, a.k, a.v)}
        ignored = [m for n, m in model.named_modules()
                   if n not in keep and not list(m.children()) and list(m.parameters(recurse=False))]
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    seconds = time.perf_counter() - start
    pruner.step()
    return model, seconds


# --- one table cell per (model, tool) ------------------------------------------------------------------

@dataclass
class Cell:
    ok: str = "-"
    kept: str = "-"
    seconds: str = "-"
    shape: str = "-"
    heads: str = "-"
    notes: list[str] = field(default_factory=list)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in flatten_outputs(model(**inputs)).items() if v.is_floating_point()}


def rel_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    if ref.keys() != got.keys() or any(ref[k].shape != got[k].shape for k in ref):
        return math.inf
    return max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:140]}" if text else type(e).__name__


def run_cell(tool: str, model: nn.Module, inputs: dict, ratio: float, timeout: float) -> Cell:
    cell = Cell()
    ref = outputs(model, inputs)
    layers = find_attention(model)
    pruned = None
    try:
        with time_limit(timeout):
            if tool == "graphopt":
                cell.seconds = f"{graphopt_analysis(model, inputs):.2f}"
                pruned = graphopt_prune(model, inputs, ratio)
            else:
                pruned, seconds = tp_prune(model, inputs, ratio)
                cell.seconds = f"{seconds:.2f}"
            got = outputs(pruned, inputs)
        cell.ok = "yes"
    except Exception as e:  # noqa: BLE001  (any failure of the tool is a result to report)
        timed_out = isinstance(e, CellTimeout)
        cell.ok = "TIMEOUT" if timed_out else "FAIL"
        if timed_out and cell.seconds == "-":
            cell.seconds = f">{timeout:.0f}"
        cell.notes.append(f"{'pruning' if pruned is None else 'forward after pruning'}: {_short(e)}")
        got = None
    if pruned is not None:
        cell.kept = f"{n_params(pruned) / n_params(model):.3f}"
    if got is not None:
        same = ref.keys() == got.keys() and all(ref[k].shape == got[k].shape for k in ref)
        cell.shape = "yes" if same else "NO"
        if not same:
            changed = [f"{k.removeprefix('output.')} {tuple(ref[k].shape)}->{tuple(got[k].shape)}"
                       for k in ref if k in got and ref[k].shape != got[k].shape]
            cell.notes.append("output shape: " + "; ".join(changed[:2]))
    if not layers:
        cell.heads = "n/a"
        return cell
    cell.heads = head_check(tool, model, inputs, layers, pruned, timeout, cell.notes,
                            skip=cell.ok == "TIMEOUT" and pruned is None)
    return cell


def head_check(tool: str, model: nn.Module, inputs: dict, layers: list[Attention], pruned: nn.Module | None,
               timeout: float, notes: list[str], skip: bool) -> str:
    """'yes' when heads stay whole at the main ratio and dead heads are removed exactly, else why not."""
    lost = False
    if pruned is not None:
        problem = width_problem(pruned, layers)
        if problem:
            notes.append(f"heads cut: {problem}")
            return "NO (widths)"
        lost, resized = heads_cut(pruned, layers)
        if resized:
            notes.append(f"head_dim shrunk in every head alike ({resized})")
    min_kv = min(a.n_kv for a in layers)
    if min_kv < 2:
        notes.append(f"dead-head check skipped: {min_kv} KV head (its query heads share it: no KV group can "
                     f"be removed)")
        return "yes (widths)" if lost else "- (no head cut)"
    if skip:
        return "-"
    fraction = 1.0 / min_kv
    dead = copy.deepcopy(model)
    kill_heads(dead, layers, fraction)
    ref = outputs(dead, inputs)
    try:
        with time_limit(timeout):
            if tool == "graphopt":
                cut = graphopt_prune(dead, inputs, fraction, attention_only=True)
            else:
                cut, _ = tp_prune(dead, inputs, fraction, attention_only=layers)
            err = rel_error(ref, outputs(cut, inputs))
    except Exception as e:  # noqa: BLE001
        notes.append(f"dead-head check (prune attention at {fraction:.2f}): {_short(e)}")
        return "FAIL" if not isinstance(e, CellTimeout) else "TIMEOUT"
    dead_lost, resized = heads_cut(cut, layers) if not width_problem(cut, layers) else (True, "")
    if err > EXACT and resized:
        notes.append(f"dead-head check inconclusive: head_dim {resized} was cut too (not dead here); "
                     f"outputs differ by {err:.2g}")
        return "? (head_dim)"
    if err > EXACT:
        notes.append(f"dead-head check: {fraction:.2f} of KV groups dead, outputs differ from the zeroed "
                     f"model by {err:.2g} (relative)")
        return "NO (dead)"
    if not dead_lost:
        notes.append(f"dead-head check: no head removed at ratio {fraction:.2f}")
        return "yes (widths)" if lost else "- (no head cut)"
    return "yes"


# --- the zoo table -----------------------------------------------------------------------------------

# --- reload with plain transformers ----------------------------------------------------------------

def save_reloadable(name: str, model: nn.Module, inputs: dict, ratio: float, root: str) -> str:
    """prune(reloadable=true), then save_pretrained into ``root/name``; '' or why it could not be written."""
    try:
        res = go.optimize(copy.deepcopy(model), inputs, f"prune(ratio={ratio},reloadable=true)", measure=False,
                          on_error="raise")
        kept = n_params(res.model) / n_params(model)
        write_for_reload(res.model, inputs, os.path.join(root, name))
        return f"kept {kept:.3f}"
    except Exception as e:  # noqa: BLE001  (a model that cannot be written is a result)
        return f"FAIL: {_short(e)}"


def zoo_table(names: list[str], ratio: float, timeout: float, tools: list[str]) -> None:
    import tempfile

    go.capture(nn.Linear(2, 2), torch.randn(1, 2))  # warm-up: torch.export's one-time setup
    rows, notes = [], []
    reload_root = tempfile.mkdtemp(prefix="graphopt-reload-")
    written: dict[str, str] = {}
    for name in names:
        try:
            model, inputs = build(name)
            with torch.no_grad():
                model(**inputs)
        except Exception as e:  # noqa: BLE001
            rows.append([name, "does not build here", *[""] * (5 * len(tools) - 1 + ("graphopt" in tools))])
            notes.append(f"{name}: {_short(e)}")
            continue
        row = [f"{name} ({n_params(model) / 1e3:.0f}K)"]
        for tool in tools:
            start = time.perf_counter()
            cell = run_cell(tool, model, inputs, ratio, timeout)
            logging.info("%s / %s: %.1f s", name, tool, time.perf_counter() - start)
            row += [cell.ok, cell.kept, cell.seconds, cell.shape, cell.heads]
            notes += [f"{name} / {tool}: {n}" for n in cell.notes]
        if "graphopt" in tools:
            written[name] = save_reloadable(name, model, inputs, ratio, reload_root)
            row.insert(6, name)  # filled in once every model is written: one reloading process for all
        rows.append(row)
        print(f"  {name} done", flush=True)
    reloaded = reload_with_transformers(reload_root) if written else {}
    for row in rows:
        if len(row) < 7 or row[6] not in written:
            continue
        name = row[6]
        result = reloaded.get(name)
        if isinstance(result, float):
            row[6] = f"yes ({written[name].removeprefix('kept ')})" if result < 1e-5 else f"NO ({result:.1e})"
        else:
            row[6] = "FAIL"
            notes.append(f"{name} / reload: {written[name] if written[name].startswith('FAIL') else result}")
    if reloaded.get("graphopt imported"):
        notes.append("the reloading process imported graphopt: the reload column does not count")
    short = {"graphopt": "go", "torch-pruning": "tp"}
    header = ["model (params)"]
    for tool in tools:
        header += [f"{short[tool]} runs", f"{short[tool]} kept", f"{short[tool]} analysis s",
                   f"{short[tool]} shape", f"{short[tool]} heads"]
        if tool == "graphopt":
            header.append("go reloads")
    print()
    print(markdown_table(header, rows))
    print("\nkept: parameters after / before. analysis s: model -> groups (go: torch.export + dimension "
          "propagation;\ntp: MetaPruner construction). heads: see the module docstring ('yes' = whole heads at "
          f"ratio {ratio} and dead heads removed exactly).\ngo reloads: prune(ratio={ratio},reloadable=true), "
          "save_pretrained, then plain from_pretrained in a process that never imports graphopt gives the same "
          "outputs (max abs error < 1e-5); in brackets the parameters kept.")
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"  - {n}")


# --- the MiniLM figure -------------------------------------------------------------------------------


def similarity(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """Mean and 5th-percentile cosine of paired embeddings; share of unchanged nearest neighbours."""
    cos = (ref * got).sum(-1)
    eye = torch.eye(ref.shape[0], dtype=torch.bool)
    same = (ref @ ref.T).masked_fill(eye, -2).argmax(1) == (got @ got.T).masked_fill(eye, -2).argmax(1)
    return float(cos.mean()), float(torch.quantile(cos, 0.05)), float(same.float().mean())


def interleaved_latency(models: list[nn.Module], inputs: dict, repeat: int) -> list[float]:
    """Median ms per forward of each model, the models run in turn so load changes hit all alike."""
    def runner(m: nn.Module):
        def run() -> None:
            with torch.no_grad():
                m(**inputs)
        return run
    return [s * 1e3 for s in interleaved_medians([runner(m) for m in models], repeat, warmup=2)]


def encoder_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


def minilm_figure(args: argparse.Namespace) -> None:
    from graphopt.data import stdlib_texts, text_batches
    from graphopt.models import load_model_spec

    model, example, tokenizer, description = load_model_spec("minilm")
    total, enc = n_params(model), encoder_params(model)
    target = (total - args.encoder_cut * enc) / total
    eval_texts = stdlib_texts(args.eval_texts, seed=0, split="eval")
    held = list(text_batches(tokenizer, eval_texts, batch_size=32, max_length=args.max_length))
    calib = list(text_batches(tokenizer, stdlib_texts(args.calib_texts, seed=0, split="calib"),
                              batch_size=16, max_length=args.max_length))
    reference = sentence_embeddings(model, held)
    print(f"\n{description}: encoder {enc / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
          f"(embeddings {sum(p.numel() for p in model.embeddings.parameters()) / 1e6:.2f}M)")
    print(f"encoder -{args.encoder_cut:.0%} => keep {target:.4f} of the whole model: "
          f"prune(target_params={target:.4f}) (uniform ratio over groups, found by bisection)")
    print(f"held-out: {len(eval_texts)} eval-split docstring texts; calibration: {args.calib_texts} "
          f"calib-split texts (disjoint)\n")
    heal = f"heal(steps={args.heal_steps},lr={args.heal_lr})"
    variants = {f"prune {imp}": f"prune(target_params={target:.4f},importance={imp})"
                for imp in args.importance.split(",")}
    if "heal" in go.list_passes() and args.heal_steps > 0:
        base = f"prune {args.heal_after}" if f"prune {args.heal_after}" in variants else next(iter(variants))
        variants[f"{base} + heal"] = f"{variants[base]},{heal}"
    else:
        print("(pass 'heal' is not registered here: no healed row)\n")
    rows, pruned = [], None
    for label, pipeline in variants.items():
        start = time.perf_counter()
        res = go.optimize(model, example, pipeline, calib=calib, measure=False, on_error="raise")
        seconds = time.perf_counter() - start
        cos, p5, nn1 = similarity(reference, sentence_embeddings(res.model, held))
        e = encoder_params(res.model)
        rows.append([label, f"{n_params(res.model) / 1e6:.2f}M", f"-{1 - e / enc:.1%}",
                     f"{cos:.4f}", f"{p5:.4f}", f"{nn1:.3f}", f"{seconds:.1f}"])
        pruned = res.model if pruned is None else pruned
    print(markdown_table(["variant", "params", "encoder", "mean cos", "p5 cos", "NN@1 same", "time s"], rows))
    print(f"pipelines: {'; '.join(variants.values())}")
    probe = next(text_batches(tokenizer, eval_texts[:args.latency_batch], batch_size=args.latency_batch,
                              max_length=args.max_length))
    base, cut = interleaved_latency([model, pruned], probe, args.latency_runs)
    shape = tuple(probe["input_ids"].shape)
    print(f"\nCPU latency, batch {shape[0]} x {shape[1]} tokens, median of {args.latency_runs} interleaved "
          f"runs, {torch.get_num_threads()} threads: original {base:.1f} ms, pruned {cut:.1f} ms, "
          f"ratio {cut / base:.3f}")


# --- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    ap.add_argument("--ratio", type=float, default=0.3, help="pruning ratio of the zoo table")
    ap.add_argument("--timeout", type=float, default=45.0, help="seconds per tool and model before TIMEOUT")
    ap.add_argument("--skip-tp", action="store_true", help="graphopt only")
    ap.add_argument("--zoo", action=argparse.BooleanOptionalAction, default=True, help="the zoo table")
    ap.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True, help="the MiniLM figure")
    ap.add_argument("--encoder-cut", type=float, default=0.3, help="share of MiniLM's encoder parameters to cut")
    ap.add_argument("--importance", default="l2,taylor", help="MiniLM rows: comma-separated l1|l2|taylor")
    ap.add_argument("--eval-texts", type=int, default=256, help="held-out sentences")
    ap.add_argument("--calib-texts", type=int, default=512, help="calibration sentences (taylor, heal)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    ap.add_argument("--heal-steps", type=int, default=100, help="heal steps (0: no heal row)")
    ap.add_argument("--heal-lr", type=float, default=3e-4, help="heal learning rate")
    ap.add_argument("--heal-after", default="taylor", help="which importance's pruned model is healed")
    ap.add_argument("--latency-batch", type=int, default=32, help="sentences per latency batch")
    ap.add_argument("--latency-runs", type=int, default=15, help="timed runs per model")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "torch_pruning", "graphopt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)

    tools = ["graphopt"]
    tp_version = "skipped"
    if not args.skip_tp:
        try:
            import torch_pruning

            tools.append("torch-pruning")
            tp_version = torch_pruning.__version__
        except ImportError:
            tp_version = "not installed (pip install torch-pruning)"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch-pruning {tp_version}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    if args.zoo:
        print(f"\nZoo: prune ratio {args.ratio}, zero configuration, {args.timeout:.0f} s limit per tool and model")
        zoo_table([m.strip() for m in args.models.split(",") if m.strip()], args.ratio, args.timeout, tools)
    if args.minilm:
        minilm_figure(args)


if __name__ == "__main__":
    main()
