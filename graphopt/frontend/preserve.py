"""Run a caller's model and leave it as it was: eval mode inside, training flags, hooks and attributes restored.

Used wherever graphopt runs the model it was handed rather than its own copy (ONNX export, the goal
search's reference outputs, timings and metric).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

log = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every module's training flag, hooks and attributes are as before.

    Running a model can leave state behind (e.g. transformers installs output-capturing hooks on the
    first call with ``output_hidden_states``); hooks and attributes added meanwhile are removed, so the
    caller's model is exactly as it was (the library re-creates them lazily when needed).
    """
    before = [(m, m.training, {h: set(getattr(m, h, None) or ()) for h in _HOOK_DICTS}, set(vars(m)))
              for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        removed = 0
        for m, training, hooks, attrs in before:
            m.training = training
            for h, keys in hooks.items():
                table = getattr(m, h, None)
                for key in [k for k in (table or ()) if k not in keys]:
                    del table[key]
                    removed += h in _HOOK_DICTS[:4]
            for attr in set(vars(m)) - attrs:
                del vars(m)[attr]
        if removed:
            log.debug("removed %d hooks that running %s installed", removed, type(model).__name__)
