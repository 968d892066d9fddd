"""Worker processes die with their parent, and stop with it.

`snowpipe run` annotates scenes in a pool of spawned processes; if the parent is killed with SIGKILL
(an OOM kill, `kill -9`, a node losing its job) the workers would otherwise wait forever on a pipe
nobody writes to. Linux delivers SIGKILL to them when the parent dies (PR_SET_PDEATHSIG).

When the parent is asked to stop (Ctrl-C, SIGTERM, SIGHUP) or a full disk stops its stage, `stop_pool` cancels
the tasks not started and sends SIGTERM to the workers: a worker started with `start_pool_worker` turns the
first stop signal into KeyboardInterrupt in the task it runs (its partial folder is removed, its lock released,
as in the parent) and starts no other task (`run_task`), so nothing is published after the stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from pipeline.interrupts import stop_now
from pipeline.locks import release_abandoned

PR_SET_PDEATHSIG = 1
STOP_GRACE = 30.0  # seconds a stopped worker has to unwind before it is killed
Result = TypeVar("Result")


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


_stopping = False  # in a pool worker: a stop signal came, no task starts any more
_in_task = False


def _stop_task(signum: int, frame: object) -> None:
    global _stopping
    if _stopping:  # once: a second signal must not break the first one's clean-up
        return
    _stopping = True
    if _in_task:
        stop_now(signum)  # at once, or when the lock release or clean-up under way is done


def start_pool_worker(parent_pid: int) -> None:
    """Pool initializer: die with the parent, and stop at SIGTERM, SIGINT or SIGHUP (see the module's docstring)."""
    die_with_parent(parent_pid)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(number) is not signal.SIG_IGN:  # inherited from nohup: it stands
            signal.signal(number, _stop_task)


def run_task(call: Callable[..., Result], *args: Any) -> Result:
    """Run one pool task, unless the worker was told to stop (then KeyboardInterrupt, without starting it)."""
    global _in_task
    _in_task = True
    try:
        if _stopping:
            raise KeyboardInterrupt("not started: the run was stopped")
        return call(*args)
    finally:
        _in_task = False
        release_abandoned()  # a lock whose release a stop cut short (pipeline/locks.py)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that die with this one and stop with it (`start_pool_worker`).

    multiprocessing's resource tracker, a helper process the pool needs, ignores SIGINT and SIGTERM but dies of
    the SIGHUP a closing terminal sends the whole group (the parent then relaunches it with a warning and a
    traceback); it is started here with SIGHUP ignored, which it keeps, and ends with this process.
    """
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            resource_tracker.ensure_running()
        finally:
            signal.signal(signal.SIGHUP, previous)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_pool_worker, initargs=(os.getpid(),))


def pool_processes(before: set[BaseProcess]) -> list[BaseProcess]:
    """This process's children that are not in `before` (multiprocessing.active_children): a pool's workers."""
    return [child for child in multiprocessing.active_children() if child not in before]


def stop_pool(pool: Executor, workers: list[BaseProcess], grace: float = STOP_GRACE) -> None:
    """Stop a pool of `start_pool_worker` processes now: SIGTERM to each worker (the running tasks unwind), the
    tasks not started cancelled, then wait until the workers have ended; one still alive after `grace` seconds
    is killed (its partial folder is reclaimed by the next run)."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    waiting = list(workers)
    while waiting and time.monotonic() < deadline:
        ended = multiprocessing.connection.wait([w.sentinel for w in waiting], deadline - time.monotonic())
        waiting = [worker for worker in waiting if worker.sentinel not in ended]
    for worker in waiting:
        worker.kill()
