"""Every Python block of the README runs as written, in order, in one namespace, in a Python started with the
repository root on its path as a user's in the clone is (issues 11 and 24).

Sizes are cut where a block trains or calibrates (``steps=2``, ``blockwise=1``, 16 calibration texts; a
bare ``heal`` gets those as options); nothing else is
changed, so a snippet that uses an undefined name or a pass that does nothing on the README's own model
fails here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SMALLER = [(r"(?<!\.)\bheal(?=[\"',)])", "heal(steps=2,blockwise=1)"),  # a bare heal gets small options
           (r"\bheal\((?![^)]*steps)", "heal(steps=2,"),
           (r"steps=\d+", "steps=2"), (r"blockwise=\d+", "blockwise=1"), (r"progressive=\d+", "progressive=2"),
           (r"stdlib_texts\(128", "stdlib_texts(16"), (r"warmup=\d+", "warmup=1")]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_the_blocks_this_test_expects():
    blocks = _blocks()
    assert len(blocks) >= 8 and "load_model_spec" in blocks[0] and "swap_gelu" in "".join(blocks)


#: runs in a fresh interpreter started as a user's would be in the clone: the repository root ahead of
#: site-packages on sys.path (so a top-level folder that shadows an installed package fails here)
RUNNER = """
import json, sys, traceback
import torch
torch.manual_seed(0)
namespace = {"__name__": "readme"}
for i, block in enumerate(json.load(open(sys.argv[1]))):
    try:
        exec(compile(block, f"README.md block {i + 1}", "exec"), namespace)
    except Exception as e:
        traceback.print_exc()
        sys.exit(f"README block {i + 1} failed: {type(e).__name__}: {e}\\n{block}")
    if "swap_gelu" in block:  # the custom pass does what the README says on the README's model
        assert namespace["res"].report.passes[1].stats == {"replaced": 6}, namespace["res"].report.passes[1].stats
    if "goal=" in block:  # the search found a model that meets the goal, and its text rebuilds it
        res = namespace["res"]
        assert res.search.best is not None and "quantize" in str(res.pipeline), str(res.search)
    if "merge_layers(latency" in block:  # LayerMerge removed activations, and heal kept the result
        res = namespace["res"]
        assert res.ok and res.report.passes[0].stats["activations_removed"] >= 1, str(res.report)
print("all blocks ran")
"""


@pytest.mark.slow
def test_every_readme_block_runs_from_the_clone_root(tmp_path):
    blocks = []
    for block in _blocks():
        for pattern, repl in SMALLER:
            block = re.sub(pattern, repl, block)
        blocks.append(block)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    root = README.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("all blocks ran")
    assert (tmp_path / "out" / "minilm.onnx").is_file() and (tmp_path / "pruned" / "config.json").is_file()
    assert '"num_hidden_layers": 4' in (tmp_path / "minilm-4-layers" / "config.json").read_text()
