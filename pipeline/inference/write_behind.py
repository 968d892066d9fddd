"""Write predictions in a thread while the next windows are predicted.

Why: compressing and writing a 2745 px window of mask.tif takes tens of milliseconds on one core, during which
the device would wait for the next batch to be issued. The queue is bounded (memory: a few windows); a write
error is raised in the caller's thread, and the caller leaving early (an error, Ctrl-C, SIGTERM) stops the
writer before the output is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")
_DONE = object()


def write_behind(items: Iterable[Item], write: Callable[[Item], None], depth: int = 4) -> None:
    """Call `write(item)` for every item, in order, on one writer thread; return when all are written."""
    pending: queue.Queue = queue.Queue(maxsize=max(1, depth))
    failure: list[BaseException] = []

    def writer() -> None:
        while True:
            item = pending.get()
            if item is _DONE:
                return
            if not failure:  # after a failure, drain without writing so the producer never blocks
                try:
                    write(item)
                except BaseException as exc:  # handed to the caller
                    failure.append(exc)

    thread = threading.Thread(target=writer, name="infer-writer", daemon=True)
    thread.start()
    try:
        for item in items:
            if failure:
                break
            pending.put(item)
    finally:
        pending.put(_DONE)
        thread.join()
    if failure:
        raise failure[0]
