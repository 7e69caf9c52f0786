"""A timed candidate's layers, costed on the goal's runtime from the latency table (issue 28's cost model).

Every layer the original or a single change calls while the timed work runs (one forward of each timed batch, or decoding
``decode`` tokens: the prompt, then one token a step) is recorded with the shapes of its inputs, hooked by
:func:`~graphopt.analysis.hooked.run_hooked`;
each (layer kind, tensors, input shapes, runtime, threads) is timed alone once, in
:class:`~graphopt.infra.latency_table.LatencyTable` (one JSON file in graphopt's cache directory, shared
by every search and by LayerMerge), and a layer's cost is the sum over its calls. On onnxruntime a layer is
exported alone and its file timed. Layers are the leaf modules that hold a tensor (linear, convolution,
embedding and norm layers, their quantized forms); what holds none (attention's matmuls, activations,
Python between layers) is the model's *rest*, which :mod:`.predict` takes from the whole-model timing.

Under ``compile=true`` the layers are timed eagerly, alone: their sum over-counts what a compiled model
spends in them, and the prediction caps the layers' share at the whole model's time.
"""

from __future__ import annotations

import inspect
import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..analysis.hooked import run_hooked
from ..frontend.inputs import ExampleInputs
from ..infra.latency_table import LatencyTable, Runner, Signature, signature_of

#: layer name -> the table's milliseconds summed over its calls (None: a layer that cannot be timed alone)
LayerTimes = dict[str, float | None]


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers as the cost model counts them: leaf modules that hold a parameter or a buffer."""
    return {name: m for name, m in model.named_modules() if name and next(m.children(), None) is None
            and next(itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)), None) is not None}


def layer_calls(model: nn.Module, inputs: ExampleInputs, decode: int = 0) -> dict[str, list[Signature | None]]:
    """The input signature of every call of each layer of ``model`` while it runs on ``inputs``: one forward, or,
    for greedy decoding of ``decode`` new tokens, the prompt's forward (logits of its last position only, where the
    model's forward takes ``logits_to_keep``) and ``decode - 1`` forwards of one token, which call every layer
    with the shapes a decoding step does (the KV cache is no layer: it is the rest's)."""
    calls: dict[str, list[Signature | None]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: calls.setdefault(n, []).append(signature_of(args)))
               for n, m in layers_of(model).items()]
    if not decode:
        run_hooked(model, [inputs], handles)
        return calls
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    prompt = ExampleInputs(inputs.args, {**inputs.kwargs, **keep})
    run_hooked(model, [prompt, _last_token(prompt)], handles)
    for name, signatures in calls.items():  # the last token's calls: once per step after the prompt
        prompt_calls = len(signatures) // 2
        calls[name] = signatures[:prompt_calls] + signatures[prompt_calls:] * (decode - 1)
    return calls


def _last_token(x: ExampleInputs) -> ExampleInputs:
    """``x`` with every token sequence (2-D integer tensors: ids, masks) cut to its last position."""
    def last(value: object) -> object:
        is_tokens = isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()
        return value[:, -1:] if is_tokens else value  # type: ignore[index]

    return ExampleInputs(tuple(last(a) for a in x.args), {k: last(v) for k, v in x.kwargs.items()})


class LayerCosts:
    """Costs candidates' layers on one runtime at the goal's settings, from one latency table."""

    def __init__(self, runtime: str, decode: int = 0, table: LatencyTable | None = None,
                 export_dir: Path | None = None) -> None:
        self.runtime, self.decode = runtime, decode
        self.table = table or LatencyTable()
        self.export_dir = export_dir
        self._files: dict[str, Path] = {}  # a layer kind on its inputs -> its ONNX file

    def profile(self, model: nn.Module, inputs: ExampleInputs, threads: int) -> LayerTimes:
        """Each layer's milliseconds on ``inputs`` at ``threads`` threads (summed over its calls)."""
        return {name: self.layer_ms(model.get_submodule(name), signatures, threads)
                for name, signatures in layer_calls(model, inputs, self.decode).items()}

    def layer_ms(self, layer: nn.Module, signatures: list[Signature | None], threads: int) -> float | None:
        """The table's milliseconds of ``layer`` summed over calls with ``signatures`` (those :func:`layer_calls`
        recorded), at ``threads`` threads; None when one call cannot be timed alone. ``layer`` may be one no model
        holds yet (a layer as a per-layer plan would make it: the table costs it all the same)."""
        total = 0.0
        for signature, count in Counter(signatures).items():
            ms = None if signature is None else self.table.ms_of(
                layer, signature, runtime=self.runtime, threads=threads, runner=self._runner())
            if ms is None:
                return None
            total += ms * count
        return total

    def save(self) -> None:
        self.table.save()

    def _runner(self) -> Runner | None:
        return self._ort_layer if self.runtime == "onnxruntime" else None

    def _ort_layer(self, layer: nn.Module, inputs: ExampleInputs, threads: int) -> Callable[[], None]:
        """One call of ``layer`` exported alone (verified in onnxruntime) and run there; a layer's file serves
        every thread count."""
        from ..emit.onnx_export import export_onnx
        from ..emit.onnx_verify import ort_runner

        if self.export_dir is None:
            raise RuntimeError("LayerCosts on onnxruntime needs export_dir= for the layers' files")
        signature = [list(map(list, s)) for s in signature_of(inputs.args) or ()]
        key = self.table.layer_key(layer, signature, "file", threads=1)  # (one thread count: any, the same for all)
        path = self._files.get(key)
        if path is None:
            path = self._files[key] = self.export_dir / f"layer{len(self._files)}.onnx"
            export_onnx(layer, inputs, path)
        return ort_runner(path, layer, inputs, threads)
