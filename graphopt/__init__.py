"""graphopt: a compiler-style graph optimizer for PyTorch models.

    import graphopt as go
    res = go.optimize(model, example_inputs, pipeline="fold_bn")
    res.report          # str(res.report) is the per-pass table
"""

from __future__ import annotations

import logging

from .analysis import PRESERVE_ALL, AnalysisManager, list_analyses, register_analysis
from .capture import CaptureError, capture
from .depgraph import DependencyGraph, Group, analyze
from .inputs import ExampleInputs, InputError, as_example_inputs, compare_outputs
from .manager import Measure, PassFailedError, PassManager, VerificationError
from .module_spec import ModuleSpecError, register_module_spec
from .onnx_export import ExportReport, OnnxExportError, OnnxVerificationError
from .optimize import OptimizeResult, optimize
from .pass_infra import Diagnostic, Pass, PassResult, get_pass, list_passes, register_pass
from .pipeline import Pipeline, PipelineError, list_presets, parse_pipeline, register_preset
from .program import Edit, EditError, Program
from .report import PassRecord, Report

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"


def export_onnx(model, example_inputs, path, **kwargs):
    """Export ``model`` to ONNX and check it in onnxruntime; see :mod:`graphopt.onnx_export`."""
    from .onnx_export import export_onnx as _export

    return _export(model, example_inputs, path, **kwargs)


def save(result, directory):
    """Save an OptimizeResult (or Program): safetensors weights + JSON edit log; see :mod:`graphopt.serialize`."""
    from .serialize import save as _save

    return _save(result, directory)


def load(directory, base_model, **kwargs):
    """Replay a saved edit log on ``base_model`` and load the weights; see :mod:`graphopt.serialize`."""
    from .serialize import load as _load

    return _load(directory, base_model, **kwargs)


__all__ = [
    "PRESERVE_ALL", "AnalysisManager", "CaptureError", "DependencyGraph", "Group", "analyze", "Diagnostic", "Edit", "EditError", "ExampleInputs",
    "ExportReport", "InputError", "Measure", "OnnxExportError", "OnnxVerificationError", "ModuleSpecError", "OptimizeResult", "Pass", "PassFailedError", "PassManager",
    "PassRecord", "PassResult", "Pipeline", "PipelineError", "Program", "Report", "VerificationError",
    "as_example_inputs", "capture", "compare_outputs", "export_onnx", "get_pass", "list_analyses",
    "list_passes", "list_presets", "load", "optimize", "parse_pipeline", "register_analysis",
    "register_module_spec", "register_pass", "register_preset", "save",
]
