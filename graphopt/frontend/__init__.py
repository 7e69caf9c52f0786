"""Stage 1, capture: example inputs, graph capture (torch.export / torch.fx), capture errors, inspection.

Imports nothing else of graphopt.
"""

from .errors import CaptureError
from .export import export_program, trace_fx
from .inputs import ExampleInputs, InputError, as_example_inputs, compare_outputs, flatten_outputs

__all__ = ["CaptureError", "ExampleInputs", "InputError", "as_example_inputs", "compare_outputs",
           "export_program", "flatten_outputs", "trace_fx"]
