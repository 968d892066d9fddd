"""Facts about processes on this host, for deciding whether a lock's holder or a scratch folder's owner still
runs: a pid alone is not enough (pids are reused), so its start time from /proc is compared too."""

from __future__ import annotations

import os
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a Linux process; None without /proc or such a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (a zombie writes nothing more) and, when `start` is given and /proc knows it, is the
    process that started then rather than a newer one that reuses the pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc (macOS): the pid alone decides
    state, started = stat
    return state not in ("Z", "X") and (not start or started == start)


def bytes_under(folder: Path) -> int:
    """Bytes a folder takes on disk (to say how much a clean-up freed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total
