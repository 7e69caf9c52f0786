"""Check a saved model the way its users will load it: plain ``from_pretrained`` in a process without graphopt.

:func:`write_for_reload` saves a model with ``save_pretrained`` next to its example inputs and outputs;
:func:`reload_with_transformers` loads every such directory under a root in a fresh Python process
that imports only torch and transformers, and returns the largest output difference per directory
(or the error). Used by the tests and by ``benchmarks/prune_zoo.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..frontend.inputs import flatten_outputs

#: Runs in the fresh process: nothing of graphopt, and it says so in its answer (a JSON file, argv[2]).
RELOADER = """
import importlib, json, os, sys
import torch, transformers
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    d = os.path.join(sys.argv[1], name)
    try:
        cfg = json.load(open(os.path.join(d, "config.json")))
        arch, kind = cfg["architectures"][0], cfg["model_type"]
        cls = getattr(transformers, arch, None)
        if cls is None:  # a base model transformers does not export at the top (WhisperEncoder)
            cls = getattr(importlib.import_module(f"transformers.models.{kind}.modeling_{kind}"), arch)
        model = cls.from_pretrained(d).eval()
        io = torch.load(os.path.join(d, "io.pt"))
        with torch.no_grad():
            got = model(**io["inputs"])
        out[name] = max(float((got[k] - v).abs().max()) for k, v in io["outputs"].items())
    except Exception as e:
        out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
out["graphopt imported"] = "graphopt" in sys.modules
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def write_for_reload(model: nn.Module, inputs: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """``model.save_pretrained(directory)`` plus ``io.pt``: the inputs and the outputs to reproduce."""
    path = Path(directory)
    model.save_pretrained(path)
    with torch.no_grad():
        outputs = flatten_outputs(model(**inputs))
    torch.save({"inputs": inputs, "outputs": {k.removeprefix("output."): v for k, v in outputs.items()}},
               path / "io.pt")
    return path


def reload_with_transformers(root: str | Path, timeout: float = 900) -> dict[str, Any]:
    """``{directory name: max abs output difference or error text, "graphopt imported": bool}``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "reload.json"
        proc = subprocess.run([sys.executable, "-c", RELOADER, str(root), str(answer)], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)
        if proc.returncode != 0 or not answer.exists():
            raise RuntimeError(f"the reloading process failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(answer.read_text())
