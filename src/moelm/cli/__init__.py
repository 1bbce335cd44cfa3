"""`moelm` command line: each subcommand parses arguments and calls the Python API, nothing more.

One module per command group (models, generation, training, evaluation, data, analysis), each registering its
subcommands. torch and the model are imported inside the commands, so `--help`, `--version` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moelm import __version__
from moelm.cli import analysis, common, data, evaluation, generation, models, planning, training

GROUPS = (models, generation, training, planning, analysis, evaluation, data)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="moelm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"moelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moelm` console script.

    User errors print one line and exit 2, a failed evaluation task 1, an interrupted run 130 (SIGINT) or 143
    (SIGTERM) after saying where it can resume from.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's own, --help included
        argv = ["lm-eval", "--", *argv[1:]] if len(argv) > 1 else argv
    args = build_parser().parse_args(argv)
    from moelm.train.interrupt import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as stop:
        print(f"moelm: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("\nmoelm: interrupted", file=sys.stderr)
        return 130
    except common.EvalTaskError as error:
        print(f"moelm: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # ConfigError, CheckpointError, DataError, ...
        print(f"moelm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
