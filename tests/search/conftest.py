"""Fixtures of the search tests: each test's own search cache and pass registry."""

import pytest

from graphopt.infra import registry
from graphopt.infra.latency_table import LatencyTable
from graphopt.search.measure import Evaluator


@pytest.fixture(autouse=True)
def own_search_cache(tmp_path, monkeypatch):
    """Searches run with cache=True keep their points in the test's folder, never in the user's cache."""
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "graphopt-cache"))


@pytest.fixture
def own_registry(monkeypatch):
    """Passes registered by a test stay in that test (the built-in ones loaded first, into the shared registry)."""
    registry.load_builtin_passes()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    """The fewest timing rounds (``Evaluator.repeat``) instead of about 2 seconds a setting: the tests' models
    time sleeps or microsecond matmuls, whose medians settle in ten rounds."""
    monkeypatch.setattr(Evaluator, "_rounds", lambda self, group: self.repeat)
    monkeypatch.setattr(LatencyTable, "repeat", 3)
    monkeypatch.setattr(LatencyTable, "seconds", 0.0)
