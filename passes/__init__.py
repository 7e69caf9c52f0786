"""Built-in passes (installed as ``graphopt.passes``). Importing this package registers them."""

from graphopt.pipeline import register_preset

from . import cleanup, fold_bn  # noqa: F401  (registration side effects)

register_preset("default", "remove_dropout,fold_bn")
