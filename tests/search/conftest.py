"""Fixtures of the search tests: each test's own search cache and pass registry."""

import pytest

from graphopt.infra import registry


@pytest.fixture(autouse=True)
def own_search_cache(tmp_path, monkeypatch):
    """Searches run with cache=True keep their points in the test's folder, never in the user's cache."""
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "graphopt-cache"))


@pytest.fixture
def own_registry(monkeypatch):
    """Passes registered by a test stay in that test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
