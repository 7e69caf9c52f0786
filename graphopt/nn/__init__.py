"""graphopt's own modules (DyT, ELN, LowRankLinear, LowRankConv2d) and the JSON module specs that rebuild
modules without pickle.

Imported by passes, emit and kernels alike; imports only graphopt.kernels (lazily, for fused ops).
"""

from .dyt import ELN, DyT
from .lowrank import LowRankConv2d, LowRankLinear
from .spec import ModuleSpecError, build_module, module_spec, register_module_spec

__all__ = ["ELN", "DyT", "LowRankConv2d", "LowRankLinear", "ModuleSpecError", "build_module", "module_spec",
           "register_module_spec"]
