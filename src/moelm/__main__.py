"""`python -m moelm ...` (and `torchrun -m moelm ...`): the same entry point as the `moelm` console script."""

import sys

from moelm.cli import main
from moelm.dist.runtime import end_process, launched_by_torchrun

code = main()
if launched_by_torchrun():  # a worker of a torchrun launch: no interpreter finalisation (see end_process)
    end_process(code)
sys.exit(code)
