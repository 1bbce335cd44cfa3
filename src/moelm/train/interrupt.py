"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, leave with 128 + signal number.

A training run that dies on the first Ctrl-C loses everything since its last checkpoint, and one that ignores it
cannot be stopped. So, as torchtitan and most schedulers expect: the first SIGINT or SIGTERM is remembered and
the loop stops cleanly after the current step (writing a checkpoint it can `--resume` from); a second one ends
the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """The run stopped on a signal; `checkpoint` is where it can resume from (None when nothing was trained)."""

    def __init__(self, step: int, signum: int, checkpoint: str | None) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        where = f"checkpoint saved in {checkpoint}; continue with --resume" if checkpoint else "nothing to save"
        super().__init__(f"interrupted at step {step} ({signal.Signals(signum).name}); {where}")

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM, as shells report a process ended by that signal."""
        return 128 + self.signum


class StopOnSignal:
    """A context that turns the first SIGINT/SIGTERM into `requested`; the second exits immediately.

    Outside the main thread (where Python cannot install handlers) it does nothing and `requested` stays None.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write(f"\nmoelm: second {name}: stopping now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
        sys.stderr.write(f"\nmoelm: {name}: finishing this step and saving a checkpoint (again to stop at once)\n")
        sys.stderr.flush()
