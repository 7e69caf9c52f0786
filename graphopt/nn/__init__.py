"""graphopt's own modules (DyT, ELN) and the JSON module specs that rebuild modules without pickle.

Imported by passes, emit and kernels alike; imports only graphopt.kernels (lazily, for fused ops).
"""

from .dyt import ELN, DyT
from .spec import ModuleSpecError, build_module, module_spec, register_module_spec

__all__ = ["ELN", "DyT", "ModuleSpecError", "build_module", "module_spec", "register_module_spec"]
