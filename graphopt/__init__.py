"""graphopt: a compiler-style graph optimizer for PyTorch models.

    import graphopt as go
    res = go.optimize(model, example_inputs, pipeline="fold_bn")
    res.report          # str(res.report) is the per-pass table
"""

from __future__ import annotations

import logging

from .analysis import (
    PRESERVE_ALL,
    AnalysisManager,
    DependencyGraph,
    Diagnostic,
    Group,
    list_analyses,
    register_analysis,
)
from .emit.onnx_report import ExportReport, OnnxExportError, OnnxVerificationError
from .frontend import CaptureError, ExampleInputs, InputError, as_example_inputs, compare_outputs
from .infra import (
    Edit,
    EditError,
    Instrument,
    Measure,
    Pass,
    PassFailedError,
    PassManager,
    PassMemory,
    PassRecord,
    PassResult,
    PassRolledBackWarning,
    Pipeline,
    PipelineError,
    Program,
    Range,
    Report,
    VerificationError,
    analyze,
    capture,
    get_pass,
    list_passes,
    list_presets,
    parse_pipeline,
    register_pass,
    register_preset,
)
from .nn.spec import ModuleSpecError, register_module_spec
from .optimize import OptimizeResult, optimize, optimize_for
from .search import Goal, GoalError, SearchResult
from .stream import StreamedResult, StreamError, optimize_streamed
from .version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())


def export_onnx(model, example_inputs, path, **kwargs):
    """Export ``model`` to ONNX and check it in onnxruntime; see :mod:`graphopt.emit.onnx_export`."""
    from .emit.onnx_export import export_onnx as _export

    return _export(model, example_inputs, path, **kwargs)


def save(result, directory):
    """Save an OptimizeResult (or Program): safetensors weights + JSON edit log; see :mod:`graphopt.emit.save`."""
    from .emit.save import save as _save

    return _save(result, directory)


def load(directory, base_model, **kwargs):
    """Replay a saved edit log on ``base_model`` and load the weights; see :mod:`graphopt.emit.load`."""
    from .emit.load import load as _load

    return _load(directory, base_model, **kwargs)


__all__ = [
    "PRESERVE_ALL", "AnalysisManager", "CaptureError", "DependencyGraph", "Group", "analyze", "Diagnostic", "Edit", "EditError", "ExampleInputs",
    "ExportReport", "Goal", "GoalError", "InputError", "Instrument", "Measure", "OnnxExportError", "OnnxVerificationError", "ModuleSpecError", "OptimizeResult", "Pass", "PassFailedError", "PassManager", "PassMemory",
    "PassRecord", "PassResult", "PassRolledBackWarning", "Pipeline", "PipelineError", "Program", "Range", "Report", "SearchResult", "VerificationError",
    "__version__", "as_example_inputs", "capture", "compare_outputs", "export_onnx", "get_pass", "list_analyses",
    "list_passes", "list_presets", "load", "optimize", "optimize_for", "optimize_streamed", "StreamedResult", "StreamError", "parse_pipeline", "register_analysis",
    "register_module_spec", "register_pass", "register_preset", "save",
]
