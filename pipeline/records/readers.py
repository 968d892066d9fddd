"""Who is reading a shared output folder (a scene's decoded rasters) right now, so that freeing it
(`decode.keep: until_used`) or decoding it again never pulls files from under a reader.

A reader registers by creating a small file in `.NAME.readers/` beside the folder (host, pid, process start
time), *then* checks the folder's record; whoever frees the folder holds its lock, removes the record *first*,
then looks for readers, and puts the record back if there are any. Whatever the interleaving, a reader either
sees no record (and reads JPEG 2000) or is seen (and the folder stays). A registration of a process that no
longer runs on this host is stale and removed; one from another host counts as live (the folder is kept: safe).
Registrations end with the process (atexit) or when `stop_reading` is called. See docs/architecture.md
("Decoded rasters").
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from pathlib import Path

from pipeline.processes import pid_alive, proc_stat
from pipeline.progress import say

_ours: set[Path] = set()


def readers_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.readers")


def _me() -> str:
    stat = proc_stat(os.getpid())
    return f"{socket.gethostname()}-{os.getpid()}-{stat[1] if stat else 0}"


def start_reading(folder: Path) -> None:
    """Register this process as a reader of `folder` (idempotent); check the folder's record after this."""
    mark = readers_folder(folder) / _me()
    if mark in _ours:
        return
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()
    _ours.add(mark)


def stop_reading(folder: Path) -> None:
    mark = readers_folder(folder) / _me()
    mark.unlink(missing_ok=True)
    _ours.discard(mark)
    try:
        mark.parent.rmdir()
    except OSError:
        pass  # other readers remain


def other_readers(folder: Path, ignore_pids: tuple[int, ...] = ()) -> list[str]:
    """Live registrations of other processes (this one, and `ignore_pids` on this host, left out); stale ones
    of this host are removed on the way."""
    marks = readers_folder(folder)
    if not marks.is_dir():
        return []
    host = socket.gethostname()
    mine = {os.getpid(), *ignore_pids}
    live = []
    for mark in marks.iterdir():
        name, _, rest = mark.name.rpartition("-")  # host-pid-start: the host may hold dashes
        reader_host, _, pid_text = name.rpartition("-")
        try:
            pid, start = int(pid_text), int(rest)
        except ValueError:
            continue
        if reader_host == host and pid in mine:
            continue
        if reader_host == host and not pid_alive(pid, start or None):
            mark.unlink(missing_ok=True)
            continue
        live.append(f"pid {pid} on {reader_host}")
    return live


def wait_for_readers(folder: Path, what: str, poll: float = 0.5, say_every: float = 30.0,
                     ignore_pids: tuple[int, ...] = ()) -> None:
    """Block until no other process reads `folder` (re-decoding replaces its files)."""
    told = 0.0
    while readers := other_readers(folder, ignore_pids):
        now = time.monotonic()
        if now - told >= say_every:
            say(f"  {what}: waiting for {', '.join(readers)}, which read {folder}")
            told = now
        time.sleep(poll)


@atexit.register
def _stop_all() -> None:
    for mark in list(_ours):
        mark.unlink(missing_ok=True)
        try:
            mark.parent.rmdir()
        except OSError:
            pass
    _ours.clear()
