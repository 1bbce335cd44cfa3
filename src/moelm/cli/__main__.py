"""`python -m moelm.cli ...`: the same entry point as the `moelm` console script."""

import sys

from moelm.cli import main

sys.exit(main())
