"""The manifest of the data a cluster run reads, and its check on the compute node.

At submission the laptop lists every synced file (path relative to its config folder, size, a hash of three
64 KiB samples: the identity completion records use) into `runs/<run_id>/data-manifest.json`. Before a job
spends GPU time, `snowpipe verify-data` checks the files its stage will read in the cluster's shared data folder
against that list: a transfer that was cut, a file changed or deleted on the cluster since submission (another
submission syncing new data into the shared folder, a user's edit) fails the job in seconds, naming the files.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.data.layout import EXOLABS_FOLDER, discover_scenes, find_auxiliary
from pipeline.data.writer import write_text
from pipeline.errors import DataError

SCHEMA = 1
SAMPLE = 64 * 1024  # bytes hashed at the start, middle and end of each file
SKIPPED = (".tmp", ".lock")  # a live writer's files are not data


def sample_hash(path: Path, size: int) -> str:
    """Content identity without reading whole scenes: three 64 KiB samples (the whole file when smaller)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        if size <= 3 * SAMPLE:
            digest.update(handle.read())
        else:
            for offset in (0, size // 2 - SAMPLE // 2, size - SAMPLE):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def _files(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(SKIPPED) and ".partial-" not in str(path):
            yield path


def build_manifest(folders: dict[str, Path]) -> dict[str, object]:
    """{"schema", "files": {"<folder>/<relative path>": [size, hash]}} for the named folders."""
    files: dict[str, list[object]] = {}
    for name, folder in folders.items():
        if folder.is_dir():
            for path in _files(folder):
                size = path.stat().st_size
                files[f"{name}/{path.relative_to(folder).as_posix()}"] = [size, sample_hash(path, size)]
    return {"schema": SCHEMA, "files": files}


def needed_by_scene(entries: Iterable[str], extracted: Path, tiles: list[str], scene: str) -> list[str]:
    """The extracted_data entries one array task reads: its SAFE folder, its day's ExoLabs file, the auxiliary
    layers (the same selection as the task's staging filters)."""
    prefixes = []
    try:
        scenes = discover_scenes(extracted, tiles, [scene]) if extracted.is_dir() else []
    except DataError:  # the scene is gone from the cluster's copy: the entries naming it are checked below
        scenes = []
    for found in scenes:
        prefixes.append(f"extracted_data/{found.safe_dir.name}/")
        if found.exolabs is not None:
            prefixes.append(f"extracted_data/{EXOLABS_FOLDER}/{found.exolabs.name}")
        auxiliary = find_auxiliary(extracted, found.tile).folder
        if auxiliary is not None:
            prefixes.append(f"extracted_data/{auxiliary.name}/")
    date = scene.rpartition("_")[2]
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    return [entry for entry in entries if entry.startswith(tuple(prefixes))
            or (not scenes and date in entry) or (not scenes and day in entry)]


def check(manifest: dict[str, object], folders: dict[str, Path], entries: list[str]) -> list[str]:
    """Problems of the listed entries in `folders` (folder name -> where it is now), one line each."""
    files = manifest["files"]
    assert isinstance(files, dict)
    problems = []
    for entry in entries:
        name, _, relative = entry.partition("/")
        size, expected = files[entry]
        path = folders[name] / relative
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry}: missing")
            continue
        if actual != size:
            problems.append(f"{entry}: {actual} bytes, {size} when submitted")
        elif sample_hash(path, actual) != expected:
            problems.append(f"{entry}: content changed since submission")
    return problems


def verify(manifest_path: Path, folders: dict[str, Path], scene: tuple[list[str], str] | None = None,
           resubmit: str = "submit again") -> str:
    """Check what a stage reads against the manifest; DataError naming the files, else a one-line summary.

    `scene` = (the config's tiles, scene ids) limits extracted_data to one array task's files."""
    started = time.monotonic()
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{manifest_path} not found: the data of this run was never completely sent; "
                        f"{resubmit}") from None
    except json.JSONDecodeError:
        raise DataError(f"{manifest_path} is damaged; {resubmit}") from None
    entries = [entry for entry in manifest.get("files", {}) if entry.partition("/")[0] in folders]
    if scene is not None and "extracted_data" in folders:
        tiles, ids = scene  # one scene id, or an array task's comma-separated ids
        others = [entry for entry in entries if not entry.startswith("extracted_data/")]
        needed = {entry for one in ids.split(",")
                  for entry in needed_by_scene(entries, folders["extracted_data"], tiles, one)}
        entries = sorted(needed) + others
    problems = check(manifest, folders, entries)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{len(problems)} of {len(entries)} input file(s) are not as submitted ({shown}): the "
                        f"transfer was cut or the cluster's copy changed; {resubmit} (rsync sends only what differs)")
    return f"data check: {len(entries)} input file(s) as submitted ({time.monotonic() - started:.1f} s)"


def main(argv: list[str]) -> int:
    """`python -m pipeline.data.manifest OUT NAME=FOLDER ...`: what the submit playbook runs after the sync."""
    if len(argv) < 2 or not all("=" in item for item in argv[1:]):
        print("usage: python -m pipeline.data.manifest OUT.json NAME=FOLDER [NAME=FOLDER ...]", file=sys.stderr)
        return 2
    folders = {name: Path(folder) for name, folder in (item.split("=", 1) for item in argv[1:])}
    manifest = build_manifest(folders)
    write_text(Path(argv[0]), json.dumps(manifest, indent=0) + "\n")
    files = manifest["files"]
    assert isinstance(files, dict)
    print(f"manifest of {len(files)} data file(s) -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
