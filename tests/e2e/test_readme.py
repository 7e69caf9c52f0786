"""Every Python block of the README runs as written, in order, in one namespace (issue 11).

Sizes are cut where a block trains or calibrates (``steps=2``, ``blockwise=1``, 16 calibration texts; a
bare ``heal`` gets those as options); nothing else is
changed, so a snippet that uses an undefined name or a pass that does nothing on the README's own model
fails here.
"""

import re
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_every_readme_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(_blocks()):
        for pattern, repl in SMALLER:
            block = re.sub(pattern, repl, block)
        try:
            exec(compile(block, f"README.md block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
        if "swap_gelu" in block:  # the custom pass does what the README says on the README's model
            assert namespace["res"].report.passes[1].stats == {"replaced": 6}
        if "merge_layers(latency" in block:  # LayerMerge removed activations, and heal kept the result
            assert namespace["res"].ok and namespace["res"].report.passes[0].stats["activations_removed"] >= 1
    assert (tmp_path / "out" / "minilm.onnx").is_file() and (tmp_path / "pruned" / "config.json").is_file()
    assert '"num_hidden_layers": 4' in (tmp_path / "minilm-4-layers" / "config.json").read_text()

