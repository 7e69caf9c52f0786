"""Stable import path of the model specs in :mod:`graphopt.helpers.models` (as the README uses it)."""

from .helpers.models import (
    LoadedModel,
    ModelSpecError,
    ResolvedSpec,
    embedded_directory,
    example_inputs_for,
    load_model_spec,
    resolve_model_spec,
)

__all__ = ["LoadedModel", "ModelSpecError", "ResolvedSpec", "embedded_directory", "example_inputs_for",
           "load_model_spec", "resolve_model_spec"]
