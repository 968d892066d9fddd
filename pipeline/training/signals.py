"""Stop requests: SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@300`, set by the submission
plan) and SIGTERM on scancel or pre-emption. Training finishes the current step, saves last.pt and exits
with EXIT_REQUEUE, so the batch script can requeue the job and the next run resumes."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

from pipeline.contract.formats import EXIT_RETRY, PROGRESS_FILE_ENV
from pipeline.data.writer import write_text
from pipeline.errors import SnowpipeError

EXIT_REQUEUE = EXIT_RETRY  # the batch script requeues the job on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# What signal.signal accepts and returns: a handler, SIG_DFL/SIG_IGN, or None (installed outside Python).
_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def report_progress(epoch: int, step: int) -> None:
    """Tell the batch script how far the saved checkpoint is: it refuses to requeue a job that made no progress
    since its last requeue. Advisory: a failure to write it never stops training."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    try:
        write_text(Path(path), f"epoch {epoch} step {step}\n")
    except (OSError, SnowpipeError):
        pass


class StopRequest:
    """A context manager that turns the stop signals into a flag checked between optimisation steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, _Handler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
