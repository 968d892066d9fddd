"""Stop signals that wait for a clean-up to finish.

A stop (Ctrl-C, scancel's SIGTERM, a closed terminal's SIGHUP, a pool worker told to stop) becomes a
KeyboardInterrupt, so that every `finally` removes its temporary outputs and releases its lock. But the
exception lands between any two bytecodes: in the middle of that very `finally`, or between creating a lock
file and the `try` that releases it, and the clean-up is cut short (a lock file naming a pid that is still
alive, a partial folder). A signal that arrives inside `uninterrupted()` is kept and raised when the
outermost block ends, so these short sections finish first; `interruptible()` reopens a wait inside one (a
lock wait may last hours and must still stop at Ctrl-C).

Only the main thread receives signals in Python, so only its sections count; in other threads both blocks
do nothing. See docs/architecture.md ("Stopping").
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_depth = 0  # uninterrupted() blocks the main thread is in
_pending = False  # a stop signal came inside one


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def stop_now(signum: int = signal.SIGINT, frame: FrameType | None = None) -> None:
    """The body of a stop signal's handler: KeyboardInterrupt now, or at the end of the current section."""
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def _raise_pending() -> None:
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block to its end; a stop signal that came meanwhile is raised when the outermost block ends
    (also when the block raised: the stop wins, the block's exception is its context)."""
    global _depth
    if not _main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _raise_pending()


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside an `uninterrupted()` block: let a stop signal through for the block's duration (a wait that holds
    nothing yet); one that came before is raised at once."""
    global _depth
    if not _main_thread() or not _depth:
        yield
        return
    saved, _depth = _depth, 0
    try:
        _raise_pending()
        yield
    finally:
        _depth = saved
