"""``python -m writesae.cli ARGS`` is ``writesae ARGS``."""

import sys

from writesae.cli import main

sys.exit(main())
