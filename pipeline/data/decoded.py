"""A scene's 13 bands decoded once, on the 10 m grid, into scratch files that serve any window.

Why: inference windows overlap by their halo, and JPEG 2000 decodes whole tiles (1024 px in L1C
products), so reading each window from the band files decoded most tiles several times (up to 9
times for the inner windows of a full tile with 1024 px windows). Here every band has one lane (a
thread with its own file handle) that walks the scene top to bottom in strips one tile high, reads
each strip exactly as SceneReader.read_band does (same resampling, same numbers) and appends it to
the band's raw file. GDAL decodes a strip's tiles on several threads, and its block cache keeps the
tile row that a resampled strip shares with the next. A window waits only for the strips it needs,
so inference starts after the first strip and overlaps the decoding of the rest.

Memory: about one strip per lane. The decoded bands live on disk, 26 bytes per pixel (3.1 GB for a
full 10980 px tile), in a scratch folder (TMPDIR: node-local and private in a batch job) that is
deleted on close. Windows are read with pread, so the scratch files never count as resident memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.data.layout import Scene
from pipeline.data.reader import SceneReader
from pipeline.errors import SceneError

DN = np.dtype(np.uint16)


class DecodedScene:
    """Start decoding on construction (a context manager); `read_dn(window)` as SceneReader's."""

    def __init__(self, scene: Scene, tile: str, scratch: Path | None = None, strip: int | None = None) -> None:
        self.scene, self.tile = scene, tile
        with SceneReader(scene, tile) as reader:  # missing bands, wrong CRS: fail here, in the caller
            self.grid = reader.grid
            # One tile row per strip; striped GeoTIFFs (1-row blocks) get 256-row strips, huge tiles 2048.
            self.strip = strip or min(max(reader.block_height(), 256), 2048)
        self.folder = Path(tempfile.mkdtemp(prefix=f"snowpipe-decoded-{scene.date}-", dir=scratch))
        self._rows = dict.fromkeys(BANDS, 0)
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._fds: dict[str, int] = {}
        try:
            for band in BANDS:
                path = self.folder / f"{band}.u16"
                path.touch()
                self._fds[band] = os.open(path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise
        # Finest bands first: they are the longest lanes.
        order = sorted(BANDS, key=lambda band: BAND_RESOLUTION[band])
        self._lanes = [threading.Thread(target=self._lane, args=(band,), name=f"decode-{band}", daemon=True)
                       for band in order]
        for lane in self._lanes:
            lane.start()

    def _lane(self, band: str) -> None:
        height, width = self.grid.height, self.grid.width
        try:
            with SceneReader(self.scene, self.tile) as reader, open(self.folder / f"{band}.u16", "r+b") as out:
                for row in range(0, height, self.strip):
                    if self._stop.is_set():
                        return
                    rows = min(self.strip, height - row)
                    dn = reader.read_band(band, Window(0, row, width, rows))
                    out.write(np.ascontiguousarray(dn, DN).data)
                    out.flush()  # visible to pread before the rows are announced
                    with self._changed:
                        self._rows[band] = row + rows
                        self._changed.notify_all()
        except OSError as exc:
            needed = len(BANDS) * DN.itemsize * height * width
            size = f"{needed / 1e9:.1f} GB" if needed >= 1e9 else f"{needed / 1e6:.0f} MB"
            error: BaseException = SceneError(
                self.scene.date,
                f"cannot write the decoded band {band} to {self.folder}: {exc.strerror} (the scene needs {size} "
                f"of scratch space: point TMPDIR to a larger folder, or set inference.decode_once: false)")
            with self._changed:
                self._error = error
                self._changed.notify_all()
        except BaseException as exc:  # raised again in every reader
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def decoded_rows(self) -> int:
        """Rows of the scene that every band has decoded so far."""
        with self._changed:
            return min(self._rows.values())

    def _wait_for(self, bottom: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._closed
                                   or min(self._rows.values()) >= bottom)
            if self._error is not None:
                raise self._error
            if self._closed:
                raise SceneError(self.scene.date, "the decoded bands were closed while being read")

    def read_dn(self, window: Window) -> np.ndarray:
        """Digital numbers (13, h, w) uint16 of a window, once every band has decoded its rows."""
        row0, col0 = int(window.row_off), int(window.col_off)
        height, width = int(window.height), int(window.width)
        self._wait_for(row0 + height)
        out = np.empty((len(BANDS), height, width), DN)
        stride = self.grid.width * DN.itemsize
        for i, band in enumerate(BANDS):
            fd = self._fds[band]
            for r in range(height):
                offset = (row0 + r) * stride + col0 * DN.itemsize
                if os.preadv(fd, [out[i, r]], offset) != width * DN.itemsize:
                    raise SceneError(self.scene.date, f"decoded band {band} is short at row {row0 + r} "
                                                      f"(is the scratch folder {self.folder} full?)")
        return out

    def close(self) -> None:
        """Stop the lanes (after their current strip), then delete the scratch files."""
        self._stop.set()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for lane in getattr(self, "_lanes", []):
            lane.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> DecodedScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
