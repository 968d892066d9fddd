"""Completion records: a small JSON beside a stage's output, written into the output before it is published.

An output counts as complete only when its record exists, names the same inputs and config, and the
files it lists are still there with their recorded sizes; so a repeated run skips finished work, and an
interrupted or changed one redoes it. Inputs are identified by their path *relative to the configured
root that holds them* (extracted_data, annotated_masks, results, ...), their size and a hash of three
64 KiB samples of their content, never by absolute path or modification time: moving or copying a project,
reaching it through a symlink, staging to node-local scratch and back all keep a record valid.

Records of snowpipe before schema 2 (absolute paths and mtimes) are upgraded in place when the outputs
they describe exist and their inputs are still the same files; otherwise the stage says once why it
redoes them. See docs/architecture.md ("Completion records").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.data.manifest import sample_hash
from pipeline.data.writer import write_json
from pipeline.progress import say

RECORD_NAME = ".snowpipe-complete.json"
SCHEMA = 2


def relative_name(path: Path, roots: Sequence[Path]) -> str:
    """The path relative to the first root that holds it (as given, then with symlinks resolved);
    a file outside every root is known by its name alone."""
    for candidate in (path, path.resolve()):
        for root in roots:
            for base in (root, root.resolve()):
                try:
                    return candidate.relative_to(base).as_posix()
                except ValueError:
                    continue
    return path.name


def fingerprint(paths: Iterable[Path | None], roots: Sequence[Path]) -> str:
    """Move-proof identity of input files: relative name, size and sampled content hash."""
    digest = hashlib.sha256()
    entries = []
    for path in paths:
        if path is None:
            continue
        try:
            size = path.stat().st_size
            entries.append(f"{relative_name(path, roots)}\0{size}\0{sample_hash(path, size)}")
        except FileNotFoundError:  # a missing input is part of the identity; the stage names it when it reads
            entries.append(f"{relative_name(path, roots)}\0missing")
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()[:16]


def config_roots(config: PipelineConfig) -> list[Path]:
    """The folders inputs are named relative to: the configured data paths, then the config's own folder."""
    return [*(config.path(name) for name in ("extracted_data", "annotated_masks", "dataset", "results", "work")),
            Path(config.base_dir)]


def key_for(stage: str, config: PipelineConfig, files: Sequence[Path | None], section: str) -> RecordKey:
    """The record key of a stage's output from its input files and its config section."""
    return RecordKey(stage, fingerprint(files, config_roots(config)), config.section_hash(section),
                     legacy_fingerprint(files))


def legacy_fingerprint(paths: Iterable[Path | None]) -> str:
    """The identity snowpipe wrote before schema 2 (absolute path, size, mtime): only to upgrade old records."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths if p is not None):
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            return "missing"
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RecordKey:
    """What a stage's output depends on: its inputs and its config section."""

    stage: str
    inputs: str  # fingerprint()
    config: str  # PipelineConfig.section_hash()
    legacy_inputs: str | None = None  # legacy_fingerprint() of the same files, to upgrade old records


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _outputs_present(folder: Path, outputs: dict[str, int]) -> bool:
    for name, size in outputs.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def output_sizes(folder: Path, names: Iterable[str]) -> dict[str, int]:
    """Sizes of the files a record vouches for (checked again whenever the record is read)."""
    return {name: (folder / name).stat().st_size for name in names}


_told: set[str] = set()


def _tell_once(stage: str, folder: Path) -> None:
    if stage not in _told:
        _told.add(stage)
        say(f"  {stage}: {folder} holds a completion record of an older snowpipe whose inputs no longer match "
            f"(moved, changed or interrupted data): redoing it, and any other such output of this stage")


def is_complete(folder: Path, key: RecordKey, required: Iterable[str] = ()) -> bool:
    """Whether `folder` holds a complete output for `key`; an old-schema record that still matches is
    rewritten in the current schema, one that does not is reported (once per stage) and redone."""
    data = _read(folder)
    if data is None or data.get("stage") != key.stage or data.get("config") != key.config:
        return False
    if data.get("schema") == SCHEMA:
        return data.get("inputs") == key.inputs and _outputs_present(folder, data.get("outputs", {}))
    names = list(required)
    if key.legacy_inputs is not None and data.get("inputs") == key.legacy_inputs and \
            all((folder / name).is_file() for name in names):
        upgrade = {k: v for k, v in data.items() if k not in ("inputs", "snowpipe")}
        write_record(folder, key, names, **upgrade)
        return True
    _tell_once(key.stage, folder)
    return False


def write_record(folder: Path, key: RecordKey, outputs: Iterable[str], **summary: object) -> None:
    """Write the record last, into the folder that is about to be published (or already is)."""
    write_json(folder / RECORD_NAME, {
        **summary,
        "schema": SCHEMA,
        "stage": key.stage,
        "inputs": key.inputs,
        "config": key.config,
        "outputs": output_sizes(folder, outputs),
        "snowpipe": __version__,
        "finished": summary.get("finished") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record's contents, for later stages that must trust only complete inputs."""
    return _read(folder)


def vouches(folder: Path) -> bool:
    """Whether the folder's record (of any version) still describes its files: schema 2 records list their
    outputs with sizes; older ones vouch for what is there."""
    data = _read(folder)
    if data is None:
        return False
    return data.get("schema") != SCHEMA or _outputs_present(folder, data.get("outputs", {}))


def clear(folder: Path) -> None:
    (folder / RECORD_NAME).unlink(missing_ok=True)
