"""Low-rank factorization: the pass (``factorize``), one layer's factors and truncation losses (``decompose``:
plain, activation-aware and whitened SVD), and ranks per layer for a ratio (``allocate``)."""

from .factorize import Factorize

__all__ = ["Factorize"]
