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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave stop signals to the trainer.

    scancel and preemption send SIGTERM to every process of the job, Ctrl-C sends SIGINT to the whole
    foreground group. A data-loading worker killed by one fails the epoch ("DataLoader worker is killed by
    signal") before the trainer can save; ignoring them lets the trainer finish its step, save and exit,
    after which DataLoader stops its workers itself (and the kernel's SIGKILL still ends them).
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
