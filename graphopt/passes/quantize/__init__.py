"""Weight (and activation) quantization: the pass (``quantize``), per-layer plans and mixed precision
(``plan``), GPTQ (``gptq``) run block by block (``sequential``), and SmoothQuant (``smoothquant``)."""

from .quantize import Quantize

__all__ = ["Quantize"]
