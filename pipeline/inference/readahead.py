"""Read the next windows in background threads while the current batch computes.

The queue is bounded, so memory holds a few windows whatever the scene size; GDAL and numpy release the
GIL, so reading (JPEG 2000 decoding, resampling, normalisation) overlaps the forward pass.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator

import numpy as np
from rasterio.windows import Window

from pipeline.inference.source import OpenInput

_DONE = object()


def read_ahead(open_input: OpenInput, windows: list[Window], readers: int = 1,
               depth: int = 2) -> Generator[tuple[int, np.ndarray, np.ndarray], None, None]:
    """Yield (index, inputs, valid) for every window; one reader keeps the order, several may not.

    An error in a reader is raised here, in the caller's thread; closing the generator (or leaving the loop and
    dropping it) stops and joins the readers.
    """
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(windows)):
        jobs.put(index)
    results: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            with open_input() as read:
                while not stop.is_set():
                    try:
                        index = jobs.get_nowait()
                    except queue.Empty:
                        break
                    put((index, *read(windows[index])))
        except BaseException as exc:  # handed to the caller, who re-raises it
            put(exc)
        put(_DONE)

    threads = [threading.Thread(target=work, name=f"infer-reader-{i}", daemon=True)
               for i in range(max(1, min(readers, len(windows))))]
    for thread in threads:
        thread.start()
    finished = 0
    try:
        while finished < len(threads):
            item = results.get()
            if item is _DONE:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join()
