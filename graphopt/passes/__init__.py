"""Built-in passes (installed as ``graphopt.passes``). Importing this package registers them."""

from graphopt.infra.registry import register_preset

from . import cleanup, depth, dyt, fold_bn, heal, merge_layers, prune, quantize  # noqa: F401  (registration side effects)

register_preset("default", "remove_dropout,fold_bn")
