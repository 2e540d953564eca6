"""`python -m tokenmill` is the `tokenmill` console script (and the torchrun entry point)."""

import sys

from tokenmill.cli import main

sys.exit(main())
