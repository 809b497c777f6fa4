"""``python -m writesae ARGS`` is ``writesae ARGS`` (where the console script is not on PATH, e.g. Colab)."""

import sys

from writesae.cli import main

sys.exit(main())
