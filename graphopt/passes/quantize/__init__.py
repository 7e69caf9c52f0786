"""Weight (and activation) quantization: the pass (``quantize``), per-layer plans and mixed precision
(``plan``), its algorithms behind one interface (``algorithms``: SmoothQuant from ``smoothquant``, round to
nearest, GPTQ from ``gptq``), and the block-by-block order of a sequential algorithm (``sequential``)."""

from .quantize import Quantize

__all__ = ["Quantize"]
