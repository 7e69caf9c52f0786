"""The dependency graph as users see it: groups, units, members, the networkx view.

Its correctness (pruning dead units is exact on every architecture) is tested through prune in
tests/passes/prune/test_prune.py and test_prune_property.py.
"""

import graphopt as go
from graphopt.helpers.zoo import hf_model


def test_dependency_graph_is_inspectable():
    model, inputs = hf_model("vit")
    graph = go.capture(model, inputs).analyses.get("dependency_graph")
    g = graph.to_networkx()
    groups = [n for n, d in g.nodes(data=True) if d["kind"] == "group"]
    assert len(groups) == len(graph.groups) == 4
    assert "4 heads x 8" in str(graph)
    head = next(grp for grp in graph.groups if grp.unit == "head")
    assert ("layers.0.attention.q_proj.weight", 0) in head.params or ("layers.1.attention.q_proj.weight", 0) in head.params
