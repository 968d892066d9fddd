"""What the benchmarks share: the machine line every result is printed with, and a cold page cache."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def usable_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> str:
    """'machine: <CPU model>, N CPUs (M usable), load average ...; <now>': results mean little without it."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"machine: {model}, {os.cpu_count()} CPUs ({usable_threads()} usable), load average {load}; "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}")


def drop_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages (written pages are flushed first), so that reading
    them costs what a cold read costs. Best effort: False where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True
