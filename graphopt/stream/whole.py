"""A streamed pipeline with passes that need the whole model: run in memory when the model fits, else refused.

``prune`` (its allocation across groups), end-to-end ``heal``, mixed precision's ranking and the others that
:meth:`graphopt.Pass.for_block` refuses cannot work one block at a time. When such a pipeline is given a model on
disk, :func:`memory_needed` estimates what ``optimize`` would hold for it (docs/scale.md's table: the weights, the
rollback snapshot, the teacher a pass reads, gradients and Adam's moments for a pass that trains), and the run
goes on in memory only where that fits the limit (by default the memory the system has available); otherwise it
is refused before any work, with the estimate, the limit and why each pass needs the whole model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..infra.contract import Pass
from ..units import GIB
from .checkpoint import Checkpoint
from .parts import read_header

log = logging.getLogger(__name__)


def checkpoint_bytes(checkpoint: Checkpoint) -> int:
    """The bytes of every tensor in the folder's safetensors files (from their headers; nothing is read)."""
    total = 0
    for path in sorted(set(checkpoint.files.values())):
        header, _ = read_header(path)
        total += sum(end - begin for begin, end in (info["data_offsets"] for info in header.values()))
    return total


def memory_needed(passes: list[Pass], weights: int) -> tuple[int, str]:
    """Bytes ``optimize(inplace=True)`` holds at least for ``passes`` on a model of ``weights`` bytes, and what
    they are: the model and the rollback snapshot; the original too for a pass that reads it (heal's teacher);
    gradients and two Adam moments for a pass that trains (``repairs``: heal). The passes' own work comes on top."""
    parts = [("the model", 1), ("the rollback snapshot", 1)]
    if any(p.needs_original for p in passes):
        parts.append(("the original, which a pass reads", 1))
    if any(p.repairs for p in passes):
        parts.append(("gradients and Adam's two moments", 3))
    total = weights * sum(k for _, k in parts)
    return total, " + ".join(f"{name} {weights * k / GIB:.1f}" for name, k in parts) + " GiB"


def available_memory() -> int | None:
    """The memory the system can give this process without swapping (Linux ``MemAvailable``), or None."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def fits_in_memory(passes: list[Pass], checkpoint: Checkpoint, limit: int | None) -> tuple[bool, str]:
    """Whether ``passes`` may run on the whole model of ``checkpoint`` in memory within ``limit`` bytes (None: what
    the system has available), and a sentence with the figures."""
    need, what = memory_needed(passes, checkpoint_bytes(checkpoint))
    given = "memory_limit" if limit is not None else "available memory"
    limit = limit if limit is not None else available_memory()
    if limit is None:
        return False, f"about {need / GIB:.1f} GiB needed ({what}); the available memory is unknown here"
    verb = "fits within" if need <= limit else "is over"
    return need <= limit, f"about {need / GIB:.1f} GiB needed ({what}) {verb} the {given} of {limit / GIB:.1f} GiB"
