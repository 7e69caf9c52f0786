"""Built-in passes (installed as ``graphopt.passes``). Importing this package registers them."""

from graphopt.pipeline import register_preset

from . import cleanup, dyt, fold_bn, heal, prune  # noqa: F401  (registration side effects)  # noqa: F401

register_preset("default", "remove_dropout,fold_bn")
