"""Models whose weights stay on disk, optimised one block at a time (issue 30; docs/scale.md).

``optimize_streamed(folder, example, "quantize(scheme=int4,method=gptq)", calib=..., out=...)`` reads an HF
folder of safetensors files block by block and writes the result as :func:`graphopt.save` does: memory
holds one block's weights and its recorded inputs, not the model.
"""

from .checkpoint import Checkpoint, StreamError, meta_skeleton, offload
from .run import StreamedResult, optimize_streamed

__all__ = ["Checkpoint", "StreamError", "StreamedResult", "meta_skeleton", "offload", "optimize_streamed"]
