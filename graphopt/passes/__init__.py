"""Built-in passes (installed as ``graphopt.passes``). Importing this package registers them."""

from graphopt.infra.registry import register_preset

from . import cleanup, depth, dyt, factorize, fold_bn, heal, layout, merge, prune, quantize  # noqa: F401  (registration side effects)

register_preset("default", "remove_dropout,fold_bn")

#: The order the built-in passes compose in (docs/reliability.md): exact clean-ups, then structure (width,
#: depth, norms), healing, quantization, and the weights' layout last. Every pair in this order runs with
#: default options on the test configs (tests/passes/test_composition.py).
ORDER = ("remove_dropout", "fold_bn", "merge_layers", "prune", "drop_blocks", "replace_blocks", "factorize", "dyt",
         "heal", "quantize", "channels_last")
