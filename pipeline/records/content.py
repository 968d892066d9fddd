"""Files known by their full content, hashed once: a cache remembers each file's hash with the stat fields
that change whenever its bytes may have (size, modification and change time, inode), so an unchanged file
costs a `stat` and a file changed anywhere is hashed again in full.

The cache lies outside the data (`$SNOWPIPE_CACHE`, else `$XDG_CACHE_HOME/snowpipe`, else `~/.cache/snowpipe`),
one small JSON per data folder (by its inode): the data the user syncs, and its fingerprints, stay untouched;
a moved project keeps its cache, a copied one is hashed once, then trusted. Where the cache cannot be written,
every read hashes in full, which is correct, only slower. See docs/architecture.md ("Completion records").
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from pipeline.data.writer import write_json
from pipeline.errors import OutputError

CHUNK = 1 << 20
_lock = threading.Lock()  # threads of one process update a folder's cache one at a time


def full_hash(path: Path) -> str:
    """blake2b of every byte (about 1 GB/s per core: little beside decoding or compressing the file)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    explicit = os.environ.get("SNOWPIPE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snowpipe"


def _cache_file(folder: Path) -> Path:
    """Keyed by the folder's device and inode, not its path: a stage's private build folder renamed into place,
    or a project moved, keeps its cache (its files keep their stat); a copy is a new folder, hashed once."""
    stat = folder.stat()
    return cache_root() / "hashes" / f"{stat.st_dev:x}-{stat.st_ino:x}.json"


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _read_cache(folder: Path) -> dict[str, list]:
    try:
        data = json.loads(_cache_file(folder).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def content_hashes(paths: list[Path], trust_cache: bool = True) -> dict[Path, str]:
    """Each file's full-content hash: from the cache when the file's stat is the one it was hashed with,
    otherwise hashed now and remembered (one cache write per folder). `trust_cache=False` hashes every file in
    full whatever the cache says (`snowpipe verify --full`). A missing file raises FileNotFoundError."""
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    found: dict[Path, str] = {}
    for folder, files in by_folder.items():
        cache = _read_cache(folder) if trust_cache else {}
        fresh: dict[str, list] = {}
        for path in files:
            stamp = _stamp(path.stat())
            entry = cache.get(path.name)
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
                found[path] = str(entry[1])
                continue
            found[path] = full_hash(path)
            if _stamp(path.stat()) == stamp:  # not written to while it was read
                fresh[path.name] = [stamp, found[path]]
        if fresh:
            _remember(folder, fresh)
    return found


def content_hash(path: Path, trust_cache: bool = True) -> str:
    return content_hashes([path], trust_cache)[path]


def _remember(folder: Path, fresh: dict[str, list]) -> None:
    with _lock:
        cache = {**_read_cache(folder), **fresh}
        cache = {name: entry for name, entry in cache.items() if (folder / name).exists()}
        try:
            write_json(_cache_file(folder), cache)
        except (OSError, OutputError):
            pass  # an unwritable cache: hashed again next time
