"""`python -m moelm ...` (and `torchrun -m moelm ...`): the same entry point as the `moelm` console script."""

import sys

from moelm.cli import main

sys.exit(main())
