"""A model's forward and its greedy decoding under ``torch.compile``, as the search and the benchmarks time them.

    step = compiled_forward(model)                    # step(*args, **kwargs): model(...) compiled by inductor
    decode = compiled_decoder(model, input_ids, 128)  # decode(): 128 greedy tokens, one compiled graph a step

Both compile without inductor's freezing (with it a weight-only quantized layer's dequantization is folded
into float32 constants at compile time: fp32 speed at fp32 memory) and each gets a code object of its own,
so the graphs dynamo keeps for one model never meet another's guards: compiling a dozen models of one class
through the same function otherwise fills one cache whose guards every call checks in turn, and past
dynamo's recompile limit falls back to eager mode. Decoding follows gpt-fast's recipe: a static KV cache
(transformers' ``StaticCache``), the prompt run eagerly, then each one-token step one graph
(``fullgraph=True``, ``dynamic=False``), so a step of a quantized layer traces its one-row reduction
(``graphopt.kernels.quant.one_row_linear``).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_serial = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a fresh code object: dynamo keeps compiled graphs per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_serial)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compile(fn: Callable[..., Any], fullgraph: bool, skip_module_guards: bool) -> Callable[..., Any]:
    options: dict[str, Any] = {"freezing": False}
    if skip_module_guards:  # nothing may change the model's modules while this runs
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(_own_code(fn), dynamic=False, fullgraph=fullgraph, options=options)


def compiled_forward(model: nn.Module) -> Callable[..., Any]:
    """``model(*args, **kwargs)`` under ``torch.compile`` (graph breaks allowed), compiled at the first call."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    return _compile(forward, fullgraph=False, skip_module_guards=False)


def compiled_decoder(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                     skip_module_guards: bool = False) -> Callable[[], torch.Tensor]:
    """Greedy decoding of ``new_tokens`` tokens after ``input_ids`` (``[batch, length]``, no padding) by a
    transformers causal LM over a static KV cache, each one-token step one compiled graph; returns a function
    that decodes and returns the new tokens ``[batch, new_tokens]``. ``skip_module_guards``: dynamo checks no
    guards on the model's modules (``skip_guard_on_all_nn_modules_unsafe``, about 1.3 ms a step on SmolLM2-135M;
    only while nothing changes them)."""
    from transformers import StaticCache

    if new_tokens < 1 or input_ids.dim() != 2:
        raise ValueError(f"compiled_decoder needs input_ids [batch, length] and new_tokens >= 1, got "
                         f"{tuple(input_ids.shape)} and {new_tokens}")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise TypeError(f"compiled_decoder decodes a transformers causal LM (with .config and .generate); "
                        f"{type(model).__name__} is not one")
    length = input_ids.shape[1]
    cache = StaticCache(config=config, max_cache_len=length + new_tokens)

    def step(ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]

    compiled = _compile(step, fullgraph=True, skip_module_guards=skip_module_guards)

    def decode() -> torch.Tensor:
        cache.reset()
        with torch.no_grad():
            tokens = [step(input_ids, torch.arange(length)).argmax(-1, keepdim=True)]
            for i in range(new_tokens - 1):
                tokens.append(compiled(tokens[-1], torch.tensor([length + i])).argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)

    return decode
