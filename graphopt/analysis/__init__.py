"""Stage 2, analysis: the analysis manager and the analyses it computes (captured graphs, the dependency
graph with its dims and per-op rules, norm recognition). Imports the frontend only.
"""

from . import blocks, graphs, hooked  # noqa: F401  (register "blocks", "call_order"; "exported", "fx_graph", "graph")
from .depgraph import DependencyGraph, Group  # registers "dependency_graph", "dependency_graph_outputs"
from .diagnostics import Diagnostic
from .manager import PRESERVE_ALL, AnalysisManager, list_analyses, register_analysis

__all__ = ["PRESERVE_ALL", "AnalysisManager", "DependencyGraph", "Diagnostic", "Group", "list_analyses",
           "register_analysis"]
