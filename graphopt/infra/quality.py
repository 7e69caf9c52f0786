"""The report's quality figure, in the user's terms, picked from what the model returns.

- an encoder's ``last_hidden_state`` with an ``attention_mask`` input: **sentence-embedding cosine**
  (masked mean pooling, then the mean cosine over sentences), what embedding models are used for;
- ``logits`` over classes ``[batch, classes]``: **top-1 agreement** with the original's prediction, and
  **top-5 agreement** (the original's class among the new five most likely) as a second figure;
- ``logits`` per token ``[batch, tokens, vocab]``: **next-token agreement** (masked by the attention
  mask when there is one), and, when the inputs hold the ``input_ids``, the **perplexity ratio** to the
  original on them (``exp`` of the mean next-token cross-entropy difference: GPTQ's figure, on the
  held-out text the caller gives);
- anything else: **output cosine**, the mean over samples of the cosine between the first floating
  outputs, each sample flattened.

Figures are computed on held-out batches when the caller gave them (``optimize(eval_data=...)``), else on
the example inputs, and the report names which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..frontend.inputs import ExampleInputs, flatten_outputs


@dataclass(frozen=True)
class Quality:
    """A named agreement figure in [0, 1] (1: the same as the original), and secondary figures by name
    (``ppl ratio``: 1 is the original's perplexity; ``top-5``)."""

    name: str
    value: float
    extra: dict[str, float] = field(default_factory=dict)


def _named(outputs: Any) -> dict[str, torch.Tensor]:
    """Floating outputs by their last name (``output.logits`` -> ``logits``), the first of each name."""
    out: dict[str, torch.Tensor] = {}
    for path, value in flatten_outputs(outputs).items():
        if value.is_floating_point():
            out.setdefault(path.rsplit(".", 1)[-1], value)
    return out


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``hidden`` [batch, tokens, dim] where ``mask`` [batch, tokens] is set."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass(frozen=True)
class Summary:
    """What the figure needs of one batch's outputs, small enough to keep: pooled embeddings, predicted
    ids, or per-sample vectors (never a vocabulary-sized logits tensor)."""

    name: str
    data: torch.Tensor
    mask: torch.Tensor | None = None
    nll: torch.Tensor | None = None  # causal LMs: the cross-entropy of each real next token (flat)
    top5: torch.Tensor | None = None  # classifiers: the five most likely classes per sample


@torch.no_grad()
def summarize(outputs: Any, inputs: ExampleInputs) -> Summary | None:
    """The figure's view of ``outputs`` (see the module docstring for which figure applies)."""
    named = _named(outputs)
    mask = inputs.kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    hidden, logits = named.get("last_hidden_state"), named.get("logits")
    if hidden is not None and mask is not None and hidden.dim() == 3 and mask.shape == hidden.shape[:2]:
        return Summary("sentence-embedding cosine", masked_mean(hidden, mask).float())
    if logits is not None and logits.dim() == 2:
        return Summary("top-1 agreement", logits.argmax(-1),
                       top5=logits.topk(min(5, logits.shape[-1]), dim=-1).indices)
    if logits is not None and logits.dim() == 3:
        keep = mask.bool() if mask is not None and mask.shape == logits.shape[:2] else None
        return Summary("next-token agreement", logits.argmax(-1), keep, nll=_next_token_nll(logits, inputs, keep))
    first = next(iter(named.values()), None)
    if first is None or not first.numel():
        return None
    return Summary("output cosine", first.reshape(first.shape[0] if first.dim() > 1 else 1, -1).float())


def _next_token_nll(logits: torch.Tensor, inputs: ExampleInputs, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The cross-entropy of each next token of ``input_ids`` under ``logits`` (positions whose token and
    predecessor are both real), or None when the inputs hold no ids of the logits' shape."""
    ids = inputs.kwargs.get("input_ids", inputs.args[0] if inputs.args else None)
    if not isinstance(ids, torch.Tensor) or ids.shape != logits.shape[:2] or ids.shape[1] < 2:
        return None
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    if keep is not None:
        nll = nll[keep[:, 1:] & keep[:, :-1]]
    return nll.reshape(-1)


def agreement(new: Summary, ref: Summary) -> tuple[float, int]:
    """(sum of per-item agreements, item count); (0, 0) when the two do not compare."""
    if new.name != ref.name or new.data.shape != ref.data.shape:
        return 0.0, 0
    if new.name in ("sentence-embedding cosine", "output cosine"):
        cos = F.cosine_similarity(new.data, ref.data, dim=-1, eps=1e-12)
        both_zero = (new.data.abs().sum(-1) == 0) & (ref.data.abs().sum(-1) == 0)
        cos = torch.where(both_zero, torch.ones_like(cos), cos)
        return float(cos.sum()), cos.numel()
    same = new.data == ref.data
    if ref.mask is not None:
        same = same[ref.mask]
    return float(same.sum()), same.numel()


def task_quality(pairs: list[tuple[Summary | None, Summary | None]]) -> Quality | None:
    """The figure over ``(new, original)`` batch summaries, with the secondary figures (perplexity ratio,
    top-5 agreement) where every compared batch has them; None if nothing compares."""
    name, total, count = "", 0.0, 0
    nll = [0.0, 0.0, 0]  # new, original, tokens
    top5 = [0.0, 0]
    compared = [(n, r) for n, r in pairs if n is not None and r is not None and agreement(n, r)[1]]
    for new, ref in compared:
        s, c = agreement(new, ref)
        name, total, count = ref.name, total + s, count + c
        if new.nll is not None and ref.nll is not None and new.nll.shape == ref.nll.shape:
            nll = [nll[0] + float(new.nll.double().sum()), nll[1] + float(ref.nll.double().sum()),
                   nll[2] + new.nll.numel()]
        if new.top5 is not None:
            hit = (new.top5 == ref.data[:, None]).any(-1)
            top5 = [top5[0] + float(hit.sum()), top5[1] + hit.numel()]
    if not count:
        return None
    extra = {}
    if nll[2] and all(n.nll is not None for n, _ in compared):
        extra["ppl ratio"] = math.exp((nll[0] - nll[1]) / nll[2])
    if top5[1] and all(n.top5 is not None for n, _ in compared):
        extra["top-5"] = top5[0] / top5[1]
    return Quality(name, total / count, extra)
