"""Dimension-propagation rules, one module per op family, registered in :data:`RULES` by op name."""

from __future__ import annotations

from . import indexing, layers, reduce, shape  # noqa: F401  (each registers its rules on import)
from .base import RULES, RuleContext, is_pointwise, op_key
from .pointwise import pointwise

# Ops that never carry channel dims through (asserts, size queries, RNG seeds): nothing to relate.
IGNORED = {"aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_size", "aten::sym_numel",
           "aten::sym_stride", "aten::_assert_async", "aten::scalar_tensor", "aten::arange", "aten::full",
           "aten::zeros", "aten::ones", "aten::empty", "aten::rand", "aten::randn", "aten::lift_fresh",
           "aten::_local_scalar_dense", "aten::item", "aten::new_ones", "aten::new_zeros", "aten::new_full",
           "aten::new_empty", "aten::new_tensor"}


__all__ = ["IGNORED", "RULES", "RuleContext", "is_pointwise", "op_key", "pointwise"]
