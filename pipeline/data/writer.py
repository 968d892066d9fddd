"""Atomic outputs: write to a temporary name beside the target, rename only when complete and checked.

A crash, a SLURM time-out or Ctrl-C therefore never leaves a file that looks finished, and a write that
fails (a full disk, a quota, a folder that turned read-only) publishes nothing: the temporary file is
removed, the previous file (if any) is kept, and the user gets one `OutputError` line naming the file
and the fix. GDAL reports many write failures only as log messages (a GeoTIFF's blocks are often
flushed when the dataset is closed, and a failed flush does not raise), so rasters are written with
GDAL's errors collected and are re-opened and read back before they are renamed.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format
import rasterio

from pipeline import faults
from pipeline.data.mask_style import cog_problems, raster_style, write_cog
from pipeline.data.raster_checks import GDAL_ERRORS, CheckedDataset, is_gdal_failure, uncompressed_bytes, verify_raster
from pipeline.errors import OutputError, SnowpipeError, output_error
from pipeline.interrupts import uninterrupted
from pipeline.progress import say


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished outputs get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()
# When a write fails for a reason that is not an OSError (GDAL, torch), a probe of this size tells
# whether the folder is full (or read-only) before the temporary file is removed.
PROBE_BYTES = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"


def _user_error(exc: OSError, target: Path, needed: int | None = None) -> OutputError | None:
    """`output_error` naming the final target, never the temporary file the OSError may carry."""
    return output_error(OSError(exc.errno, exc.strerror), target, needed)


def _about_this_output(exc: OSError, target: Path, tmp: Path | None) -> bool:
    """True when the OSError concerns the output (its folder, temporary or name), not an input read."""
    if exc.filename is None:
        return True
    path = Path(os.fsdecode(exc.filename))
    return path in {target, tmp} or path in target.parents or path.parent == target.parent


def space_error(target: Path, probe_bytes: int = PROBE_BYTES, needed: int | None = None) -> OutputError | None:
    """The OutputError when `target`'s folder cannot take `probe_bytes` more (full, quota, read-only), else None.

    Call it while the failed temporary file still exists, so the folder is as full as when the write failed.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".snowpipe-space-probe.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        return _user_error(exc, target, needed)
    try:
        os.posix_fallocate(fd, 0, max(1, probe_bytes))
    except OSError as exc:
        return _user_error(exc, target, needed)
    finally:
        os.close(fd)
        with suppress(OSError):
            os.unlink(probe)
    return None


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (a folder: the names in it). Filesystems that cannot
    sync a folder (some network mounts say EINVAL) are left to their own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path, needed: int | None = None, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces the target.

    A write error publishes nothing: the temporary file is removed, the previous target is untouched,
    and a full disk, quota or read-only folder becomes one OutputError line (with `needed` bytes when
    known). Other failures of the block are re-raised unchanged, unless the folder then turns out to be
    full (a library such as torch reports a full disk as its own error type).
    """
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with uninterrupted():  # a stop signal waits until the temporary file is known, to be removed
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, mode)
        fsync_path(tmp)  # its bytes on disk before its name: a node crash never publishes a file of zeros
        os.replace(tmp, target)
        tmp = None
        fsync_path(target.parent)  # and the rename itself
        faults.reached(f"published {target.name}")
    except SnowpipeError:
        raise
    except OSError as exc:
        error = _user_error(exc, target, needed) if _about_this_output(exc, target, tmp) else None
        if error is None and tmp is not None:
            error = space_error(target, needed or PROBE_BYTES, needed)
        if error is None:
            raise
        raise error from exc
    except Exception as exc:
        error = space_error(target, needed or PROBE_BYTES, needed) if tmp is not None else None
        if error is None:
            raise
        raise error from exc
    finally:
        with uninterrupted():
            if tmp is not None:
                with suppress(OSError):
                    tmp.unlink(missing_ok=True)


def _write_failure(target: Path, profile: dict[str, Any], messages: list[str]) -> OutputError:
    """The error for a raster that failed: a full or read-only folder if the probe says so, else GDAL's words."""
    total, block = uncompressed_bytes(profile)
    error = space_error(target, min(max(block, PROBE_BYTES), total + 65536))
    if error is not None:
        return error
    detail = " ".join(messages[0].split())  # the first error is the cause, the others follow from it
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return OutputError(f"cannot write {target}: {detail}; nothing was published "
                       f"(a previous {target.name}, if any, is kept)")


@contextmanager
def atomic_raster(target: Path, profile: dict[str, Any]) -> Iterator[CheckedDataset]:
    """Open a raster for writing (window by window); it appears under its name only when it closed without
    a GDAL error and reads back as written. Any failure removes the temporary file and raises
    (OutputError: one line naming the file, and for a full or read-only folder the fix).

    A class raster is styled by its name (pipeline/data/mask_style.py): `mask.tif` gets the legend's colour
    table and class names and is published as a Cloud-Optimized GeoTIFF (written as a tiled GeoTIFF beside
    the temporary file, then copied with its overviews and checked), `probabilities.tif` gets band names."""
    style = raster_style(target.name, profile)
    errors: list[str] = []
    with atomic_path(target) as tmp, GDAL_ERRORS.listening():
        draft = tmp.with_name(tmp.name + ".draft") if style is not None and style.cog else tmp
        sidecars = {path.with_name(path.name + ".aux.xml") for path in (tmp, draft)}
        try:
            try:
                with GDAL_ERRORS.into(errors):
                    dataset = rasterio.open(draft, "w", **profile)
            except Exception as exc:
                if not is_gdal_failure(exc):
                    raise
                raise _write_failure(target, profile, errors or [str(exc)]) from exc
            checked = CheckedDataset(dataset, errors, lambda messages: _write_failure(target, profile, messages))
            try:
                if style is not None:
                    style.apply(checked)
                yield checked
            except BaseException:
                with GDAL_ERRORS.into([]), rasterio.Env(), suppress(Exception):
                    dataset.close()
                raise
            with GDAL_ERRORS.into(errors), rasterio.Env():  # the Env routes close's errors to logging
                try:
                    dataset.close()
                except Exception as exc:
                    errors.append(str(exc))
            if errors:
                raise _write_failure(target, profile, errors)
            if draft != tmp:
                _copy_cog(draft, tmp, target, profile)
            problem = verify_raster(tmp, profile)
            if problem:
                raise _write_failure(target, profile, [problem])
        finally:
            with uninterrupted():
                for path in ({draft} - {tmp}) | sidecars:
                    with suppress(OSError):
                        path.unlink(missing_ok=True)


def _copy_cog(draft: Path, tmp: Path, target: Path, profile: dict[str, Any]) -> None:
    """The closed draft GeoTIFF as a Cloud-Optimized GeoTIFF at `tmp`; a failed or invalid copy is an
    OutputError (decided while both files still take their space)."""
    errors: list[str] = []
    try:
        with GDAL_ERRORS.into(errors), rasterio.Env():
            write_cog(draft, tmp, profile)
    except Exception as exc:
        if not is_gdal_failure(exc):
            raise
        raise _write_failure(target, profile, errors or [str(exc)]) from exc
    if errors:
        raise _write_failure(target, profile, errors)
    problems = cog_problems(tmp)
    if problems:
        raise _write_failure(target, profile, [f"it is not a valid Cloud-Optimized GeoTIFF: {'; '.join(problems)}"])


def check_png(path: Path, target: Path) -> None:
    """Raise OutputError unless `path` holds a whole PNG (signature first, end chunk last)."""
    size = path.stat().st_size
    with path.open("rb") as png:
        head = png.read(len(PNG_SIGNATURE))
        png.seek(max(0, size - len(PNG_END)))
        tail = png.read()
    if head != PNG_SIGNATURE or tail != PNG_END:
        raise space_error(target) or OutputError(
            f"cannot write {target}: the image came out incomplete ({size} bytes); nothing was published")


def allocate_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of `shape` and `dtype`, its whole size reserved on disk, mapped for writing.

    Unlike `numpy.lib.format.open_memmap` (a sparse file that dies of SIGBUS when the disk fills while
    the map is written), a disk without room is an OutputError naming the file and the MB needed, and
    no file is left. Filesystems that cannot reserve space get today's sparse file.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = _npy_header(header)
    total = len(buffer) + dtype.itemsize * math.prod(shape)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as exc:
        error = _user_error(exc, path, total)
        if error is None:
            raise
        raise error from exc
    try:
        view = memoryview(buffer)
        while view:
            view = view[os.write(fd, view):]
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            os.ftruncate(fd, total)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        error = _user_error(exc, path, total)
        if error is None:
            raise
        raise error from exc
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(buffer), shape=shape, order="C")


def _npy_header(header: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(out, header)
    except ValueError:  # more than 65535 bytes of header: format 2.0
        out = io.BytesIO()
        npy_format.write_array_header_2_0(out, header)
    return out.getvalue()


def swap_folder(new: Path, target: Path) -> None:
    """Put a finished folder in place of `target`: the old one is moved aside and removed only afterwards,
    so a crash leaves either the old complete folder or the new one, never a mix. If the swap fails (a
    read-only mount, another filesystem), the old folder is put back and `new` is left as it was.

    A symlinked `target` is replaced as a link (what it points to is never touched). An old folder that cannot
    be removed (an immutable file, a file still open on NFS, `.nfs*`) is named with the file that holds it:
    after a swap in a warning (the new folder is published), before one as an OutputError, `target` kept as
    it was (the aside name is taken)."""
    old = target.with_name(f".{target.name}.old.tmp")
    try:
        stuck = remove_folder(old)
        if stuck is not None:
            raise OutputError(f"cannot replace {target}: {held(old, *stuck)}; {target} is kept as it was",
                              stuck[1].errno)
        moved = False
        if os.path.lexists(target):
            target.rename(old)
            moved = True
            faults.reached(f"moved aside {target.name}")
        try:
            new.rename(target)
        except BaseException:
            if moved:
                old.rename(target)
            raise
    except OSError as exc:
        error = _user_error(exc, target)
        if error is None:
            raise
        raise error from exc
    faults.reached(f"swapped {target.name}")
    stuck = remove_folder(old)
    if stuck is not None:
        say(f"  warning: {target} is published, but {held(old, *stuck)}")


def remove_folder(path: Path) -> tuple[Path, OSError] | None:
    """Delete a folder snowpipe made, or a symlink (never what it points to); None once nothing is left, else
    the entry that holds it and why, found by removing what remains deepest first."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_dir():
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return path, exc
        return None
    shutil.rmtree(path, ignore_errors=True)
    for root, folders, files in os.walk(path, topdown=False):
        for name in [*files, *folders]:
            entry = Path(root) / name
            try:
                entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                return entry, exc
    try:
        path.rmdir()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return path, exc
    return None


def held(folder: Path, entry: Path, exc: OSError) -> str:
    """Why `folder` is still there, naming the file that holds it and what to do."""
    reason = exc.strerror or str(exc)
    if entry.name.startswith(".nfs"):
        fix = "a file still open by some process on an NFS client; end it (lsof, fuser) and delete the folder"
    elif exc.errno == errno.EPERM:
        fix = "an immutable or append-only file (lsattr shows it); chattr -i it and delete the folder"
    else:
        fix = "delete the folder by hand"
    return f"the old copy {folder} cannot be removed: {entry}: {reason} ({fix})"


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files a killed run left behind (they never look complete, but they take space).

    Folders are left alone: a `.NAME.old.tmp` folder may be the only complete copy after a crash.
    """
    if folder.is_dir():
        for stale in folder.glob(".*.tmp*"):
            if not stale.is_dir():
                stale.unlink(missing_ok=True)


def write_json(target: Path, data: Any) -> None:
    """Write JSON atomically; a short write or a full disk publishes nothing (OutputError)."""
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(target: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write a text file atomically; a short write or a full disk publishes nothing (OutputError)."""
    encoded = text.encode()
    with atomic_path(target, mode=mode) as tmp:
        with tmp.open("wb") as handle:
            handle.write(encoded)
        if tmp.stat().st_size != len(encoded):
            raise OutputError(f"cannot write {target}: only {tmp.stat().st_size} of {len(encoded)} bytes "
                              f"were written; nothing was published")
