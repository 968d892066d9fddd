"""Atomic outputs: write to a temporary name beside the target, rename only when complete.

A crash, a SLURM time-out or Ctrl-C therefore never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rasterio


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished outputs get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_raster(target: Path, profile: dict[str, Any]) -> Iterator[rasterio.io.DatasetWriter]:
    """Open a GeoTIFF for writing (window by window); it appears under its name only when closed cleanly."""
    with atomic_path(target) as tmp:
        with rasterio.open(tmp, "w", **profile) as dataset:
            yield dataset


def swap_folder(new: Path, target: Path) -> None:
    """Put a finished folder in place of `target`: the old one is moved aside and removed only afterwards,
    so a crash leaves either the old complete folder or the new one, never a mix."""
    old = target.with_name(f".{target.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files a killed run left behind (they never look complete, but they take space)."""
    if folder.is_dir():
        for stale in folder.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)


def write_json(target: Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
