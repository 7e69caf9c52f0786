"""``python -m graphopt.cli``: the same as the ``graphopt`` command."""

import sys

from .main import main

sys.exit(main())
