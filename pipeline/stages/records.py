"""Completion records: a small JSON beside a stage's output, written last.

An output counts as complete only when its record exists and names the same inputs and config;
so a repeated run skips finished work, and an interrupted or changed one redoes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from pipeline.data.writer import write_json

RECORD_NAME = ".snowpipe-complete.json"


def fingerprint(paths: Iterable[Path | None]) -> str:
    """Cheap identity of input files: name, size and modification time (no content hashing)."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths if p is not None):
        stat = Path(path).stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def is_complete(folder: Path, stage: str, inputs: str, config: str) -> bool:
    record = folder / RECORD_NAME
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return data.get("stage") == stage and data.get("inputs") == inputs and data.get("config") == config


def mark_complete(folder: Path, stage: str, inputs: str, config: str, **summary: object) -> None:
    write_json(folder / RECORD_NAME, {
        "stage": stage,
        "inputs": inputs,
        "config": config,
        "snowpipe": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **summary,
    })


def clear(folder: Path) -> None:
    (folder / RECORD_NAME).unlink(missing_ok=True)
