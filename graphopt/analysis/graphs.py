"""The captured graphs as analyses.

- ``"exported"``: the :class:`torch.export.ExportedProgram`;
- ``"fx_graph"``: a :class:`torch.fx.GraphModule` (shapes in ``node.meta["tensor_meta"]``);
- ``"graph"``: a networkx view of the exported graph (see :func:`graphopt.frontend.nodes.graph_view`).
"""

from __future__ import annotations

import networkx as nx
from torch import fx
from torch.export import ExportedProgram

from ..frontend.export import export_program, trace_fx
from ..frontend.nodes import graph_view
from .manager import AnalysisManager, Analyzable, register_analysis


@register_analysis("exported")
def _exported(program: Analyzable, am: AnalysisManager) -> ExportedProgram:
    return export_program(program.module, program.example_inputs)


@register_analysis("fx_graph")
def _fx_graph(program: Analyzable, am: AnalysisManager) -> fx.GraphModule:
    return trace_fx(program.module, program.example_inputs)


@register_analysis("graph")
def _graph(program: Analyzable, am: AnalysisManager) -> nx.DiGraph:
    return graph_view(am.get("exported"))
