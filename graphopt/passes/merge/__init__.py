"""Layer merging (LayerMerge): the pass (``merge_layers``), exact conv/linear composition
(``layer_math``), the layer links of a captured graph (``links``), the DP over segments (``dp``) and the
measured latency table it costs them with."""

from .merge_layers import MergeLayers

__all__ = ["MergeLayers"]
