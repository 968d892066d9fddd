"""A DataLoader's batches whose worker processes end with the block that reads them, on every path.

Why: torch stops a DataLoader's workers when its iterator is freed (documented behaviour). An exception (a stop
signal, a diverged loss) used to keep the iterator alive until exit through the traceback's frames; at exit,
multiprocessing sends SIGTERM to the workers, which ignore it (pipeline/workers.py), and then waits for them
forever. Here the iterator's only reference is dropped when the block ends, and the finished frames of an
exception's traceback are cleared first, so torch frees it at once; no private torch API is called.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader

from pipeline.progress import say


class Batches:
    """Iterates the loader; holds its iterator in a box that `close` empties (the caller's name for this object
    may live on in a traceback: it no longer reaches the iterator)."""

    def __init__(self, loader: DataLoader) -> None:
        self._box = [iter(loader)]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        return next(self._box[0])

    def close(self) -> weakref.ref | None:
        """Drop the iterator; a weak reference to it, to check that it is gone."""
        if not self._box:
            return None
        gone = weakref.ref(self._box[0])
        self._box.clear()
        return gone


@contextmanager
def worker_batches(loader: DataLoader) -> Iterator[Batches]:
    """`with worker_batches(loader) as batches: x, y = next(batches)`: the loader's workers have ended when the
    block has, whether it finished, broke off or raised."""
    batches = Batches(loader)
    try:
        yield batches
    except BaseException as exc:
        _clear_finished_frames(exc)
        raise
    finally:
        gone = batches.close()
        if gone is not None and gone() is not None:
            gc.collect()  # a reference cycle through the iterator
            if gone() is not None:  # never seen; said rather than raised, so as not to hide the error in flight
                say("warning: a DataLoader iterator outlived its block: its worker processes may delay the exit "
                    "(pipeline/training/batches.py)")


def _clear_finished_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames of an exception and of those it was raised from or during
    (`raise ... from`): the running frames are left as they are (traceback.clear_frames skips them)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
