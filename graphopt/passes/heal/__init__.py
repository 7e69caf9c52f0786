"""Healing after a lossy pass: the pass (``heal``), its training loop with held-out checks (``run``),
losses, recipes per kind of change, block-wise reconstruction (``blockwise``) and LoRA adapters."""

from .heal import Heal

__all__ = ["Heal"]
