"""The ``graphopt`` command line (``graphopt = graphopt.cli:main``)."""

from .commands import describe_passes
from .console import DEFAULT_CALIB_SIZE, UsageError
from .main import build_parser, main

__all__ = ["DEFAULT_CALIB_SIZE", "UsageError", "build_parser", "describe_passes", "main"]
