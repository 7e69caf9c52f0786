"""The package layout stays layered: no import cycles, and imports point down the stages.

Edges come from the AST of every module of graphopt (graphopt/, with graphopt/passes/ and graphopt/kernels/): top-level
imports, imports inside functions and ``TYPE_CHECKING`` blocks alike. The one kind of import left
out is a lazy import that a registry needs, which must say so in a ``# lazy:`` comment on the line
before it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: where each import name lives in the source tree
PACKAGE_DIRS = {"graphopt": ROOT / "graphopt"}

#: The layers, top to bottom (docs/design.md). A module may import its own layer and the layers below.
LAYERS = [
    ["graphopt", "graphopt.cli", "graphopt.models", "graphopt.data", "graphopt.helpers"],
    ["graphopt.optimize", "graphopt.stream"],
    ["graphopt.search"],
    ["graphopt.emit"],
    ["graphopt.passes"],
    ["graphopt.infra"],
    ["graphopt.analysis"],
    ["graphopt.frontend", "graphopt.nn"],
    ["graphopt.kernels"],
    ["graphopt.timing", "graphopt.compiled", "graphopt.version", "graphopt.progress", "graphopt.units",
     "graphopt.cache"],
]


def _modules(package_dirs: dict[str, Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            out.setdefault(name, path)
    return out


MODULES = _modules(PACKAGE_DIRS)


def _is_lazy_registry_import(lines: list[str], node: ast.AST) -> bool:
    previous = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
    return previous.startswith("# lazy:")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    text = path.read_text()
    lines = text.splitlines()
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        if _is_lazy_registry_import(lines, node):
            continue
        found += [(t, node.lineno) for t in targets if t in modules and t != name]
    return found


def import_graph(modules: dict[str, Path] = MODULES) -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target, line in _imports(name, path, modules):
            graph.add_edge(name, target, line=line)
    return graph


def _layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{module} is in no layer of tests/test_layout.py; add it to LAYERS"
    return best[1]


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert len(MODULES) > 40
    assert graph.has_edge("graphopt.infra.program", "graphopt.analysis.manager")
    assert graph.has_edge("graphopt.passes.prune.prune", "graphopt.analysis.depgraph")


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_imports_point_down_the_stages():
    graph = import_graph()
    upward = [f"{a} -> {b} (line {d['line']})" for a, b, d in graph.edges(data=True) if _layer(a) > _layer(b)]
    assert not upward, "imports from a lower layer to a higher one: " + "; ".join(upward)


def _family(module: str) -> str | None:
    """The pass family a module belongs to: ``prune`` for ``graphopt.passes.prune.apply``, ``dyt`` for a flat pass."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["graphopt", "passes"] else None


def cross_family_imports(graph: nx.DiGraph) -> list[str]:
    """Imports from one pass family into another (``graphopt.passes`` itself, the registration hub, aside)."""
    return [f"{a} -> {b} (line {d['line']})" for a, b, d in graph.edges(data=True)
            if _family(a) and _family(b) and _family(a) != _family(b)]


def test_pass_families_do_not_import_each_other():
    """What two families share lives in analysis/ or frontend/; a pass that runs another asks the registry."""
    crossing = cross_family_imports(import_graph())
    assert not crossing, ("imports between pass families (move what they share to graphopt/analysis or "
                          "graphopt/frontend, or get the pass with get_pass): " + "; ".join(crossing))


def test_the_family_rule_names_an_import_between_two_families(tmp_path):
    passes = tmp_path / "graphopt" / "passes"
    (passes / "heal").mkdir(parents=True)
    for f in ("__init__.py", "dyt.py", "heal/__init__.py", "heal/heal.py", "heal/run.py"):
        (passes / f).write_text("")
    (passes / "__init__.py").write_text("from . import dyt, heal\n")
    (passes / "heal" / "heal.py").write_text("from .run import x\n")
    (passes / "dyt.py").write_text("from .heal.heal import Heal\n")
    graph = import_graph(_modules({"graphopt": tmp_path / "graphopt"}))
    assert [c.split(" (")[0] for c in cross_family_imports(graph)] == ["graphopt.passes.dyt -> graphopt.passes.heal.heal"]


DESIGN = ROOT / "docs" / "design.md"


def folder_map(text: str) -> dict[str, tuple[str, str]]:
    """design.md's folder map: first cell (``graphopt/passes/prune/``) -> (holds, imports)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `graphopt/") and len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _row_folder(cell: str) -> str:
    return cell.split("`")[1]


def _stage(module: str, folders: list[str]) -> str:
    """How the map names the stage of ``module``: its deepest row folder (``passes/prune``), else its own name."""
    path = module.replace(".", "/") + "/"
    inside = [f for f in folders if path.startswith(f) and f != "graphopt/"]
    return max(inside, key=len)[len("graphopt/"):].rstrip("/") if inside else module.split(".")[1]


def expected_imports(folder: str, folders: list[str], graph: nx.DiGraph) -> str:
    """The map's "imports" cell for ``folder``: the stages its modules import, top to bottom."""
    own = [m for m in graph if (m.replace(".", "/") + "/").startswith(folder)
           and not any(f != folder and f.startswith(folder) and (m.replace(".", "/") + "/").startswith(f)
                       for f in folders)]
    if folder == "graphopt/":
        own = [m for m in graph if m.count(".") <= 1 and not any((m.replace(".", "/") + "/").startswith(f)
                                                              for f in folders if f != "graphopt/")]
    targets = {b for a in own for b in graph.successors(a)
               if not (b.replace(".", "/") + "/").startswith(folder) or folder == "graphopt/" and b.count(".") > 1}
    stages = {_stage(b, folders): _layer(b) for b in targets}
    return ", ".join(sorted(stages, key=lambda s: (stages[s], s))) or "nothing of graphopt"


def map_drift(text: str, graph: nx.DiGraph, root: Path = ROOT) -> list[str]:
    """Where design.md's folder map and the source tree disagree."""
    rows = folder_map(text)
    folders = [_row_folder(c) for c in rows if _row_folder(c).endswith("/")]
    problems = []
    for pkg in sorted(p.parent for p in (root / "graphopt").rglob("__init__.py")):
        folder = str(pkg.relative_to(root)) + "/"
        parent_row = next((c for c in rows if _row_folder(c) == str(pkg.parent.relative_to(root)) + "/"), None)
        if folder not in folders and not (parent_row and f"`{pkg.name}/`" in rows[parent_row][0]):
            problems.append(f"{folder} has no row (or a `{pkg.name}/` mention in its parent's row)")
    first_cells = " ".join(rows)
    for cell, (holds, imports) in rows.items():
        folder = _row_folder(cell)
        if not folder.endswith("/"):
            continue
        for path in sorted((root / folder).glob("*.py")):
            mentions = (f"`{path.name}`" in holds, f"`{path.stem}`" in holds, f"`{path.name}`" in first_cells,
                        f"/{path.name}`" in first_cells)
            if path.stem != "__init__" and not any(mentions):
                problems.append(f"{folder}{path.name} is not named in its row")
        want = expected_imports(folder, folders, graph)
        if imports != want:
            problems.append(f"{folder} imports: the map says {imports!r}, the code imports {want!r}")
    return problems


def test_the_folder_map_in_design_md_matches_the_tree():
    problems = map_drift(DESIGN.read_text(), import_graph())
    assert not problems, "docs/design.md's folder map has drifted: " + "; ".join(problems)


def test_the_folder_map_check_names_a_missing_module_and_a_wrong_imports_cell():
    text = DESIGN.read_text()
    rows = folder_map(text)
    cell = next(c for c in rows if _row_folder(c) == "graphopt/infra/")
    holds, imports = rows[cell]
    broken = text.replace(holds, holds.replace("`registry.py`", "`registy.py`")).replace(
        f"| {imports} |", "| analysis |")
    problems = map_drift(broken, import_graph())
    assert any("graphopt/infra/registry.py is not named" in p for p in problems), problems
    assert any(p.startswith("graphopt/infra/ imports: the map says 'analysis'") for p in problems), problems


def test_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "graphopt").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500}
    assert not big, f"split these along a seam (docs/design.md): {big}"


def test_function_and_type_checking_imports_count_and_lazy_registry_imports_do_not(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from .b import f\n")
    (pkg / "d.py").write_text("def g():\n    # lazy: the registry loads c on first use\n    from . import c\n")
    graph = import_graph(_modules({"pkg": pkg}))
    assert sorted(map(sorted, nx.simple_cycles(graph))) == [["pkg.a", "pkg.b"]]
    assert graph.has_edge("pkg.c", "pkg.b") and not graph.has_edge("pkg.d", "pkg.c")


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed, f"missing from pyproject: {packages - listed}; stale: {listed - packages}"


def shadowing_entries(root: Path, owners: dict[str, list[str]]) -> dict[str, list[str]]:
    """Top-level entries of ``root`` named like a module another installed distribution provides.

    Python puts the working directory first on ``sys.path`` (``python -c``, ``python -m pytest``, the
    REPL), so a folder or ``.py`` file there with such a name replaces the installed module for every
    importer: transformers 5.25 imports HF's ``kernels`` distribution, and a top-level ``kernels/``
    folder once made a fresh clone fail before any test ran.
    """
    entries = {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
               if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}
    return {name: owners[name] for name in sorted(entries) if set(owners.get(name, [])) - {"graphopt"}}


def test_the_shadowing_check_names_a_folder_called_like_an_installed_distribution(tmp_path):
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "graphopt").mkdir()
    owners = importlib.metadata.packages_distributions()
    assert sorted(shadowing_entries(tmp_path, owners)) == ["numpy", "torch"]


def test_no_top_level_entry_shadows_an_installed_distribution():
    clashes = shadowing_entries(ROOT, importlib.metadata.packages_distributions())
    assert not clashes, f"rename these top-level entries, they shadow installed distributions: {clashes}"


def test_python_started_in_the_repository_root_imports_the_installed_dependencies():
    """What a contributor does first: ``python -c`` / pytest from the clone root, with transformers' model code."""
    code = ("import graphopt, transformers.modeling_utils, pathlib, sys; "
            "print(pathlib.Path(graphopt.__file__).resolve().parent.parent)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == ROOT
