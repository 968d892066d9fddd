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

Scratch left by a killed run (kill -9, OOM killer, node crash) is reclaimed: the folder's name says who
owns it (`snowpipe-decoded-{date}-{host}-{pid}-{start}-{random}`, start = the process start time from
/proc, so a reused pid is not mistaken for the owner), and every new DecodedScene removes the folders in
its scratch dir whose owner on this host is dead, saying how much it freed. Folders of other hosts (a
shared scratch dir) and of live processes are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.data.layout import Scene
from pipeline.data.reader import SceneReader
from pipeline.errors import SceneError
from pipeline.faults import reached
from pipeline.processes import bytes_under, pid_alive, proc_stat
from pipeline.progress import say

DN = np.dtype(np.uint16)
PREFIX = "snowpipe-decoded-"


def _host() -> str:
    """This host's name as it appears in scratch folder names (no '-' splitting trouble: only the last
    three '-'-separated fields of a name are parsed, and no field after the host holds a '-')."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def owner_tag() -> str:
    """'{host}-{pid}-{start}' of this process (start 0 where /proc is missing)."""
    stat = proc_stat(os.getpid())
    return f"{_host()}-{os.getpid()}-{stat[1] if stat else 0}"


def _human(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def reclaim_scratch(scratch: Path | None = None) -> tuple[int, int]:
    """Remove the decoded scratch folders in `scratch` (TMPDIR by default) whose owner on this host is dead,
    say in one line how much that freed, and return (folders, bytes) removed."""
    folder = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
    host = _host()
    removed, freed = 0, 0
    try:
        candidates = [path for path in folder.iterdir() if path.name.startswith(PREFIX)]
    except OSError:
        return 0, 0
    for path in candidates:
        parts = path.name[len(PREFIX):].rsplit("-", 3)  # {scene id}-{host}, pid, start, random
        if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
            continue  # not ours to judge (an older snowpipe's name, or someone else's)
        named = re.fullmatch(r"(?:\d{2}[A-Z]{3}_)?\d{8}T\d{6}-(.+)", parts[0])  # ids, and dates before them
        if named is None or named[1] != host or not path.is_dir() or path.is_symlink():
            continue  # another host's folder, in a scratch dir shared between nodes
        if pid_alive(int(parts[1]), int(parts[2])):
            continue
        size = bytes_under(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed, freed = removed + 1, freed + size
    if removed:
        say(f"freed {_human(freed)} of decoded scratch left by {removed} killed run(s) in {folder}")
    return removed, freed


class DecodedScene:
    """Start decoding on construction (a context manager); `read_dn(window)` as SceneReader's."""

    def __init__(self, scene: Scene, tile: str, scratch: Path | None = None, strip: int | None = None) -> None:
        self.scene, self.tile = scene, tile
        with SceneReader(scene, tile) as reader:  # missing bands, wrong CRS or grid: fail here, in the caller
            self.grid = reader.grid
            # One tile row per strip; striped GeoTIFFs (1-row blocks) get 256-row strips, huge tiles 2048.
            self.strip = strip or min(max(reader.block_height(), 256), 2048)
        reclaim_scratch(scratch)
        self._rows = dict.fromkeys(BANDS, 0)
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._fds: dict[str, int] = {}
        self._lanes: list[threading.Thread] = []
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{scene.id}-{owner_tag()}-", dir=scratch))
        except OSError as exc:
            raise SceneError(scene.id, self._no_scratch(scratch or tempfile.gettempdir(), exc)) from None
        try:  # also on KeyboardInterrupt (SIGTERM from scancel): no scratch outlives a failed start
            for band in BANDS:
                path = self.folder / f"{band}.u16"
                path.touch()
                self._fds[band] = os.open(path, os.O_RDONLY)
            # Finest bands first: they are the longest lanes.
            for band in sorted(BANDS, key=lambda band: BAND_RESOLUTION[band]):
                lane = threading.Thread(target=self._lane, args=(band,), name=f"decode-{band}", daemon=True)
                self._lanes.append(lane)
                lane.start()
        except BaseException:
            self.close()
            raise

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
                    reached("decoded strip")
        except OSError as exc:
            error: BaseException = SceneError(self.scene.id, self._no_scratch(self.folder, exc, band))
            with self._changed:
                self._error = error
                self._changed.notify_all()
        except BaseException as exc:  # raised again in every reader
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _no_scratch(self, folder: object, exc: OSError, band: str | None = None) -> str:
        needed = len(BANDS) * DN.itemsize * self.grid.height * self.grid.width
        what = f"write the decoded band {band} to" if band else "create the decoded scratch folder in"
        return (f"cannot {what} {folder}: {exc.strerror or exc} (the scene needs {_human(needed)} of scratch "
                f"space: point TMPDIR to a larger, writable folder, or set inference.decode_once: false)")

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
                raise SceneError(self.scene.id, "the decoded bands were closed while being read")

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
                    raise SceneError(self.scene.id, f"decoded band {band} is short at row {row0 + r} "
                                                      f"(is the scratch folder {self.folder} full?)")
        return out

    def close(self) -> None:
        """Stop the lanes (after their current strip), then delete the scratch files.

        The files go even when the wait for the lanes is interrupted (a second SIGTERM): a lane still
        writing then writes to an unlinked file, whose space the system frees when the lane ends.
        """
        self._stop.set()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        try:
            for lane in self._lanes:
                if lane is not threading.current_thread():
                    lane.join()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> DecodedScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
