"""Structured pruning: the pass (``prune``), applying a keep plan (``apply``), the same-graph check
(``check``) and the HF config kept in step with the new widths (``hf_sync``)."""

from .apply import register_size_attrs
from .prune import Prune

__all__ = ["Prune", "register_size_attrs"]
