"""Worker processes die with their parent.

`snowpipe run` annotates scenes in a pool of spawned processes; if the parent is killed with SIGKILL
(an OOM kill, `kill -9`, a node losing its job) the workers would otherwise wait forever on a pipe
nobody writes to. Linux delivers SIGKILL to them when the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
