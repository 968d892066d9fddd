"""Completion records: a small JSON beside a stage's output, written into the output before it is published.

An output counts as complete only when its record exists, names the same inputs and config, and the
files it lists are still there with their recorded size and content; so a repeated run skips finished work,
and an interrupted, damaged or changed one redoes it. Inputs are identified by their path *relative to the
configured root that holds them* (extracted_data, annotated_masks, results, ...) and a hash of their full
content (pipeline/records/content.py: hashed once, then known by their stat), never by absolute path or
modification time: moving or copying a project, reaching it through a symlink, staging to node-local scratch
and back all keep a record valid. Outputs carry their size, full hash and a sampled hash: every read checks
the size and samples and, through the hash cache, the full content of any file whose stat changed;
`snowpipe verify --full` hashes every byte.

Records of an older snowpipe (schema 1: absolute paths and mtimes; schema 2: sampled inputs, output sizes)
are upgraded in place when the outputs they describe exist and their inputs are still the same files;
otherwise the stage says once why it redoes them. See docs/architecture.md ("Completion records").
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.data.manifest import sample_hash
from pipeline.data.writer import write_json
from pipeline.progress import say
from pipeline.records.content import content_hashes

RECORD_NAME = ".snowpipe-complete.json"
DATASET_MANIFEST = "manifest.json"  # the dataset's record: its manifest (pipeline/stages/dataset.py)
SCHEMA = 3
SAMPLED_SCHEMA = 2  # inputs by three 64 KiB samples, outputs by size: upgraded in place when still true


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


def _regular(path: Path) -> bool:
    """Only regular files are read for their identity: a FIFO would hang, a folder cannot be hashed."""
    return stat.S_ISREG(path.stat().st_mode)


def fingerprint(paths: Iterable[Path | None], roots: Sequence[Path], sampled: bool = False) -> str:
    """Move-proof identity of input files: relative name and full content (`sampled`: name, size and three
    samples, the identity of schema 2, only to upgrade its records)."""
    digest = hashlib.sha256()
    entries = []
    present: list[Path] = []
    for path in paths:
        if path is None:
            continue
        name = relative_name(path, roots)
        try:
            if not _regular(path):
                entries.append(f"{name}\0not a file")  # the stage that reads it names it
            elif sampled:
                size = path.stat().st_size
                entries.append(f"{name}\0{size}\0{sample_hash(path, size)}")
            else:
                present.append(path)
        except FileNotFoundError:  # a missing input is part of the identity; the stage names it when it reads
            entries.append(f"{name}\0missing")
    if present:
        try:
            hashes = content_hashes(present)
        except FileNotFoundError:  # removed between the stat and the hash: named as missing next time
            hashes = {path: "missing" for path in present}
        entries += [f"{relative_name(path, roots)}\0{value}" for path, value in hashes.items()]
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()[:16]


def config_roots(config: PipelineConfig) -> list[Path]:
    """The folders inputs are named relative to: the configured data paths, then the config's own folder."""
    return [*(config.path(name) for name in ("extracted_data", "annotated_masks", "dataset", "results", "work",
                                             "decoded")),
            Path(config.base_dir)]


def key_of_files(stage: str, files: Sequence[Path | None], roots: Sequence[Path], config_hash: str) -> RecordKey:
    """The record key of an output made from `files`, with the identities older records used for them."""
    return RecordKey(stage, fingerprint(files, roots), config_hash, tuple(files), tuple(roots))


def key_for(stage: str, config: PipelineConfig, files: Sequence[Path | None], section: str,
            tile: str | None = None) -> RecordKey:
    """The record key of a stage's output from its input files and its config section; a per-scene output
    gives its scene's `tile` (its key then does not change when the config gains or loses another tile)."""
    return key_of_files(stage, files, config_roots(config), config.section_hash(section, tile=tile))


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
    """What a stage's output depends on: its inputs and its config section. The identities older records gave
    the same files are computed only when such a record is met (they read samples and stat every file)."""

    stage: str
    inputs: str  # fingerprint()
    config: str  # PipelineConfig.section_hash()
    files: tuple[Path | None, ...] = field(default=(), compare=False, repr=False)
    roots: tuple[Path, ...] = field(default=(), compare=False, repr=False)

    @functools.cached_property
    def legacy_inputs(self) -> str | None:
        """legacy_fingerprint() of the same files, to upgrade schema 1 records."""
        return legacy_fingerprint(self.files) if self.files else None

    @functools.cached_property
    def sampled_inputs(self) -> str | None:
        """fingerprint(sampled=True) of the same files, to upgrade schema 2 records."""
        return fingerprint(self.files, self.roots, sampled=True) if self.files else None


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def output_problems(folder: Path, outputs: dict[str, Any], full: bool = False) -> list[str]:
    """What is wrong with the files a record vouches for ([] = intact): missing, another size, other content.
    Every check compares the size and three samples, and the full hash through the hash cache (a file whose
    stat changed is hashed again in full); `full` hashes every file in full."""
    problems = []
    present: dict[Path, str] = {}
    for name, entry in outputs.items():
        path = folder / name
        size, digest, sample = (entry.get("size"), entry.get("hash"), entry.get("sample")) \
            if isinstance(entry, dict) else (entry, None, None)
        try:
            if not _regular(path):
                problems.append(f"{path}: not a file")
                continue
            actual = path.stat().st_size
            if actual != size:
                problems.append(f"{path}: {actual} bytes, the record says {size}")
            elif sample is not None and sample_hash(path, actual) != sample:
                problems.append(f"{path}: its content changed since it was written (sampled)")
            elif digest is not None:
                present[path] = digest
        except OSError:
            problems.append(f"{path}: missing")
    if present:
        try:
            hashes = content_hashes(list(present), trust_cache=not full)
        except OSError:
            return [*problems, *(f"{path}: missing" for path in present if not path.exists())]
        problems += [f"{path}: its content changed since it was written" for path, digest in present.items()
                     if hashes[path] != digest]
    return problems


def _outputs_present(folder: Path, outputs: dict[str, Any]) -> bool:
    return not output_problems(folder, outputs)


def output_entries(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size, full hash and sampled hash of the files a record vouches for, computed as the record is written
    (the files were just written: their bytes are in the page cache)."""
    paths = [folder / name for name in names]
    hashes = content_hashes(paths)
    return {path.name: {"size": path.stat().st_size, "hash": hashes[path],
                        "sample": sample_hash(path, path.stat().st_size)} for path in paths}


def _sizes_present(folder: Path, sizes: dict[str, Any]) -> bool:
    """A schema 2 record's check: every file there with its size."""
    try:
        return all(isinstance(size, int) and (folder / name).stat().st_size == size for name, size in sizes.items())
    except OSError:
        return False


_told: set[str] = set()


def _tell_once(stage: str, folder: Path) -> None:
    if stage not in _told:
        _told.add(stage)
        say(f"  {stage}: {folder} holds a completion record of an older snowpipe whose inputs no longer match "
            f"(moved, changed or interrupted data): redoing it, and any other such output of this stage")


def is_complete(folder: Path, key: RecordKey, required: Iterable[str] = ()) -> bool:
    """Whether `folder` holds a complete output for `key`; an older record that still matches is rewritten in
    the current schema, one that does not is reported (once per stage) and redone."""
    data = _read(folder)
    if data is None or data.get("stage") != key.stage or data.get("config") != key.config:
        return False
    if data.get("schema") == SCHEMA:
        return data.get("inputs") == key.inputs and _outputs_present(folder, data.get("outputs", {}))
    names = list(required)
    if data.get("schema") == SAMPLED_SCHEMA:
        sizes = data.get("outputs", {})
        if key.sampled_inputs is not None and data.get("inputs") == key.sampled_inputs and \
                isinstance(sizes, dict) and _sizes_present(folder, sizes):
            upgrade = {k: v for k, v in data.items() if k not in ("inputs", "snowpipe", "outputs", "schema")}
            write_record(folder, key, list(sizes), **upgrade)
            return True
    elif key.legacy_inputs is not None and data.get("inputs") == key.legacy_inputs and \
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
        "outputs": output_entries(folder, outputs),
        "snowpipe": __version__,
        "finished": summary.get("finished") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def write_record_data(folder: Path, data: dict[str, Any]) -> None:
    """Put back a record as it was read (a release that found readers after removing it)."""
    write_json(folder / RECORD_NAME, data)


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record's contents, for later stages that must trust only complete inputs."""
    return _read(folder)


def vouches(folder: Path) -> bool:
    """Whether the folder's record (of any version) still describes its files: schema 3 records by size and
    content, schema 2 by size; older ones vouch for what is there."""
    data = _read(folder)
    if data is None:
        return False
    outputs = data.get("outputs", {})
    if data.get("schema") == SCHEMA:
        return _outputs_present(folder, outputs)
    return data.get("schema") != SAMPLED_SCHEMA or (isinstance(outputs, dict) and _sizes_present(folder, outputs))


def clear(folder: Path) -> None:
    (folder / RECORD_NAME).unlink(missing_ok=True)
