"""Checks that a written raster really is what was written: GDAL's errors collected per thread while a
dataset is open (rasterio raises for only some of them and logs the rest), and a read-back of the closed
file (shape, band count, dtype, every block inside the file, the last blocks decoded) before the atomic
writer (pipeline/data/writer.py) renames it into place.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Interleaving
from rasterio.errors import NotGeoreferencedWarning, RasterioError


class _GdalErrorLog(logging.Handler):
    """Collects, per thread, the GDAL errors that rasterio logs (it raises for only some of them).

    rasterio sends a GDAL failure (CE_Failure) to Python logging at INFO level ("GDAL signalled an
    error"); while anything listens, those loggers are set to pass INFO, and the previous level is
    restored when the last listener leaves.
    """

    LOGGERS = ("rasterio._env", "rasterio._err", "rasterio._io", "rasterio._base")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._local = threading.local()
        self._guard = threading.Lock()
        self._listeners = 0
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        sinks = getattr(self._local, "sinks", None)
        if not sinks:
            return
        error = record.levelno >= logging.ERROR or str(record.msg).startswith("GDAL signalled an error")
        if not error and record.levelno < logging.WARNING:
            return
        args = record.args
        message = str(args[1]) if isinstance(args, tuple) and len(args) == 2 else record.getMessage()
        for sink, with_warnings in sinks:
            if error or with_warnings:
                sink.append(message)

    @contextmanager
    def listening(self) -> Iterator[None]:
        with self._guard:
            if self._listeners == 0:
                for name in self.LOGGERS:
                    logger = logging.getLogger(name)
                    self._levels[name] = logger.level
                    if not logger.isEnabledFor(logging.INFO):
                        logger.setLevel(logging.INFO)
                    logger.addHandler(self)
            self._listeners += 1
        try:
            yield
        finally:
            with self._guard:
                self._listeners -= 1
                if self._listeners == 0:
                    for name in self.LOGGERS:
                        logger = logging.getLogger(name)
                        logger.removeHandler(self)
                        logger.setLevel(self._levels.pop(name, logging.NOTSET))

    @contextmanager
    def into(self, sink: list[str], warnings: bool = False) -> Iterator[list[str]]:
        """GDAL errors of this thread go to `sink` inside the block (call within `listening`); with `warnings`,
        its warnings too (OpenJPEG decodes a damaged code stream with only a warning: the decode stage)."""
        sinks = self._local.__dict__.setdefault("sinks", [])
        sinks.append((sink, warnings))
        try:
            yield sink
        finally:
            for i in range(len(sinks) - 1, -1, -1):
                if sinks[i][0] is sink:
                    del sinks[i]
                    break


GDAL_ERRORS = _GdalErrorLog()


def _silence_libtiff_stderr() -> bool:
    """Stop libtiff's process-wide error handler from printing straight to stderr; True when done.

    GDAL gives each TIFF it opens handlers of its own (its errors reach GDAL_ERRORS), but its file I/O
    callbacks report through libtiff's global handler, whose default prints: a full disk printed ~90
    `_tiffSeekProc: No space left on device.` lines above snowpipe's one line. Those failures also fail the
    write through GDAL, so nothing is lost. Finds the libtiff this process loaded (with GDAL); elsewhere a no-op.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
    except OSError:
        return False
    done = False
    for path in sorted(paths):
        try:
            libtiff = ctypes.CDLL(path)
            libtiff.TIFFSetErrorHandler.restype = ctypes.c_void_p
            libtiff.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
            libtiff.TIFFSetErrorHandler(None)
            done = True
        except (OSError, AttributeError):
            continue
    return done


LIBTIFF_QUIET = _silence_libtiff_stderr()


def is_gdal_failure(exc: BaseException) -> bool:
    return isinstance(exc, (RasterioError, OSError)) or type(exc).__module__.startswith("rasterio._")


class CheckedDataset:
    """The open rasterio dataset of `atomic_raster`: each call to it runs with GDAL's errors collected,
    and the first error stops the write at once (the disk is not filled further) with an OutputError
    decided while the temporary file still holds its space."""

    def __init__(self, dataset: rasterio.io.DatasetWriter, errors: list[str],
                 failure: Callable[[list[str]], Exception]) -> None:
        object.__setattr__(self, "_dataset", dataset)
        object.__setattr__(self, "_errors", errors)
        object.__setattr__(self, "_failure", failure)  # the error to raise for GDAL's messages

    def _checked(self, call, *args, **kwargs):
        before = len(self._errors)
        with GDAL_ERRORS.into(self._errors):
            try:
                result = call(*args, **kwargs)
            except Exception as exc:
                if is_gdal_failure(exc) or len(self._errors) > before:
                    raise self._failure(self._errors[before:] or [str(exc)]) from exc
                raise
        if len(self._errors) > before:
            raise self._failure(self._errors[before:])
        return result

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._dataset, name)
        if not callable(value):
            return value

        def checked(*args: Any, **kwargs: Any) -> Any:
            return self._checked(value, *args, **kwargs)

        return checked

    def __setattr__(self, name: str, value: Any) -> None:
        self._checked(setattr, self._dataset, name, value)


def uncompressed_bytes(profile: dict[str, Any]) -> tuple[int, int]:
    """(whole raster, one block) in bytes, uncompressed: what a write may need at most."""
    width, height = int(profile["width"]), int(profile["height"])
    pixel = int(profile.get("count", 1)) * np.dtype(profile["dtype"]).itemsize
    if profile.get("tiled"):
        block = int(profile.get("blockxsize", 256)) * int(profile.get("blockysize", 256))
    else:
        block = width * min(height, 256)
    return width * height * pixel, block * pixel


def verify_raster(path: Path, profile: dict[str, Any]) -> str | None:
    """Why the closed raster at `path` is not what was written (None when it reads back): it must open,
    have the size, bands and type written, every GeoTIFF block must lie inside the file, and its last
    block (in the grid and in the file) must decode."""
    expected = (int(profile["width"]), int(profile["height"]), int(profile.get("count", 1)),
                np.dtype(profile["dtype"]).name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                found = (ds.width, ds.height, ds.count, ds.dtypes[0])
                if found != expected or len(set(ds.dtypes)) != 1:
                    return (f"it reads back as {ds.width}x{ds.height} px, {ds.count} band(s) of {ds.dtypes[0]}, "
                            f"not {expected[0]}x{expected[1]} px, {expected[2]} band(s) of {expected[3]}")
                rows = math.ceil(ds.height / ds.block_shapes[0][0])
                cols = math.ceil(ds.width / ds.block_shapes[0][1])
                reads = [(None, ds.block_window(1, rows - 1, cols - 1))]
                if ds.driver == "GTiff":
                    problem, last = _check_blocks(ds, path.stat().st_size, rows, cols,
                                                  sparse=bool(profile.get("sparse_ok")))
                    if problem:
                        return problem
                    if last is not None:
                        reads.append(last)
                for band, window in reads:
                    ds.read(band, window=window)
    except Exception as exc:  # any failure to read back is a reason not to publish
        return f"it does not read back ({exc})"
    return None


def _check_blocks(ds, file_size: int, rows: int, cols: int, sparse: bool):
    """(problem or None, (band, window) of the block stored last in the file) from the TIFF block table."""
    bands = range(1, ds.count + 1) if ds.count > 1 and ds.interleaving == Interleaving.band else [1]
    last, last_end = None, -1
    for band in bands:
        for row in range(rows):
            for col in range(cols):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                if offset is None:  # this GDAL does not report block offsets
                    return None, last
                size = int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band) or 0)
                if int(offset) == 0 or size == 0:
                    if sparse:
                        continue
                    return f"block {row},{col} of band {band} was never written", None
                end = int(offset) + size
                if end > file_size:
                    return f"the file ends at byte {file_size}, before block {row},{col} (up to byte {end})", None
                if end > last_end:
                    last_end = end
                    last = (band if len(bands) > 1 else None, ds.block_window(band, row, col))
    return None, last
