"""One writer at a time: a lock per output (a stage folder or a scene folder).

Two `snowpipe run` of one config, two SLURM array tasks, or a requeued job and its ghost must never write the
same output at once. Whoever writes `target` holds `output_lock(target, what)`; the lock is a small JSON file
beside the target, `target.parent / ".<name>.lock"`, so it lives on the same file system, works before the
target exists and is never inside a folder that gets swapped.

Taking it works on NFS and Lustre: the content is written to a uniquely named file, which is then hard-linked
to the lock name (atomic on NFS, where O_EXCL was not always); success is confirmed by the link count and the
content. While held, a daemon thread refreshes the file's mtime every heartbeat. The lock is released when the
block ends, also on an exception, Ctrl-C or SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt), and only
while it is still ours; a stop signal waits while the lock is being taken or released (pipeline/interrupts.py).
A process asking again for a lock it holds gets it at once (threads of one process share
it); child processes do not inherit it.

A lock whose writer is gone is broken automatically (renamed to a unique name, checked, then removed, so two
breakers cannot both win), with one line saying whose it was:
- same host: its pid is dead, or the pid now belongs to another process (start time from /proc differs), or the
  machine rebooted since;
- another host, with a SLURM job id other than ours: `squeue` (SNOWPIPE_SQUEUE) says the job is no longer running
  (not listed, "Invalid job id", or pending / requeued / finished) and its heartbeat has stopped (no refresh for
  two of the holder's heartbeats);
- another host where that cannot be decided (no job id, squeue missing or failing, or our own job id: a requeued
  job finding its previous run): its heartbeat is older than STALE_AFTER (600 s; at least two heartbeats);
- an unreadable lock file: not modified for 10 s (or STALE_AFTER if smaller).
Ages are measured against the file server's clock (the mtime of a file just written there), not the local one.

A live holder makes us say once who holds it and wait, polling with back-off, until it is released or it dies;
SNOWPIPE_LOCK_TIMEOUT seconds (default: as long as the holder lives; 0 = do not wait) ends the wait with
`LockBusy` (exit 75), naming the holder and the lock file.

Environment (seconds): SNOWPIPE_LOCK_TIMEOUT, SNOWPIPE_LOCK_HEARTBEAT (30), SNOWPIPE_LOCK_STALE_AFTER (600),
SNOWPIPE_LOCK_POLL (first poll interval, 1), SNOWPIPE_LOCK_POLL_MAX (longest poll interval, 15);
SNOWPIPE_SQUEUE: the squeue command (default `squeue`).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import faults
from pipeline.contract.formats import EXIT_RETRY
from pipeline.errors import OutputError, SnowpipeError, output_error
from pipeline.interrupts import interruptible, uninterrupted
from pipeline.processes import pid_alive, proc_stat
from pipeline.progress import say

HEARTBEAT = 30.0  # seconds between refreshes of a held lock's mtime
STALE_AFTER = 600.0  # a lock from another host whose liveness cannot be decided is stale after this many seconds
POLL = 1.0  # first interval between tries while a live writer holds the lock
POLL_MAX = 15.0  # the back-off stops here
UNREADABLE_AFTER = 10.0  # an unreadable lock file not modified for this long is stale
SQUEUE_TIMEOUT = 30.0  # seconds squeue may take before its answer counts as "cannot decide"
SQUEUE_CACHE = 30.0  # a job squeue found running is asked about again after this many seconds

# squeue states in which the job's processes may still run (and write)
ACTIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
                 "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT", "POWER_UP_NODE", "UPDATE_DB"}
UNSUPPORTED_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class LockBusy(SnowpipeError):
    """The output is locked by a live writer and SNOWPIPE_LOCK_TIMEOUT ran out."""

    exit_code = EXIT_RETRY  # EX_TEMPFAIL: try again later


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    host: str
    pid: int
    start: int | None  # process start time, clock ticks after boot (/proc/<pid>/stat field 22); None off Linux
    boot: str | None  # /proc/sys/kernel/random/boot_id: a reboot kills every holder of the host
    slurm_job: str | None  # SLURM_JOB_ID
    slurm_array_job: str | None  # SLURM_ARRAY_JOB_ID
    slurm_array_task: str | None  # SLURM_ARRAY_TASK_ID
    what: str
    started: str  # UTC, ISO 8601
    heartbeat: float  # the holder's heartbeat interval, seconds
    token: str  # unique per acquisition: tells our lock from a later one

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LockInfo | None:
        """The lock's content, or None when it is not a lock file this version can read."""
        try:
            data = json.loads(raw.decode())
            return cls(host=str(data["host"]), pid=int(data["pid"]),
                       start=None if data.get("start") is None else int(data["start"]),
                       boot=_opt(data.get("boot")), slurm_job=_opt(data.get("slurm_job")),
                       slurm_array_job=_opt(data.get("slurm_array_job")),
                       slurm_array_task=_opt(data.get("slurm_array_task")),
                       what=str(data.get("what", "?")), started=str(data.get("started", "?")),
                       heartbeat=float(data.get("heartbeat", HEARTBEAT)), token=str(data.get("token", "")))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return None

    @property
    def job(self) -> str | None:
        """The SLURM job as squeue and sacct name it: `ARRAY_TASK` for an array task, else the job id."""
        if self.slurm_array_job and self.slurm_array_task:
            return f"{self.slurm_array_job}_{self.slurm_array_task}"
        return self.slurm_job

    def holder(self) -> str:
        """`pid P on HOST (SLURM job J) since T`."""
        job = f" (SLURM job {self.job})" if self.job else ""
        return f"pid {self.pid} on {self.host}{job} since {self.started}"


def _opt(value: object) -> str | None:
    return None if value in (None, "") else str(value)


# --- settings -----------------------------------------------------------------------------------------------

def _seconds(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SnowpipeError(f"{name}={raw!r} is not a number of seconds >= 0; fix or unset it")
    return value


def _positive(name: str, default: float) -> float:
    value = _seconds(name, default)
    assert value is not None
    if value <= 0:
        raise SnowpipeError(f"{name}={os.environ[name]!r} must be more than 0 seconds; fix or unset it")
    return value


# --- facts about processes ----------------------------------------------------------------------------------

HOST = socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _our_info(what: str, heartbeat: float) -> LockInfo:
    stat = proc_stat(os.getpid())
    env = os.environ
    return LockInfo(host=HOST, pid=os.getpid(), start=stat[1] if stat else None, boot=_boot_id(),
                    slurm_job=_opt(env.get("SLURM_JOB_ID")), slurm_array_job=_opt(env.get("SLURM_ARRAY_JOB_ID")),
                    slurm_array_task=_opt(env.get("SLURM_ARRAY_TASK_ID")), what=what,
                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"), heartbeat=heartbeat,
                    token=uuid.uuid4().hex)


_squeue_running: dict[tuple[str, str], float] = {}  # (squeue command, job) -> when squeue last said it runs


def _job_gone(job: str) -> bool | None:
    """True when squeue says the job no longer runs, False when it runs, None when that cannot be decided."""
    spelt = os.environ.get("SNOWPIPE_SQUEUE", "").strip() or "squeue"
    seen = _squeue_running.get((spelt, job))
    if seen is not None and time.monotonic() - seen < SQUEUE_CACHE:
        return False
    command = shlex.split(spelt)
    if not command or shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run([*command, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                timeout=SQUEUE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if "invalid job id" in (result.stdout + result.stderr).lower():
        return True
    if result.returncode != 0:
        return None
    states = {line.strip().upper() for line in result.stdout.splitlines() if line.strip()}
    if states & ACTIVE_STATES:
        _squeue_running[(spelt, job)] = time.monotonic()
        return False
    return True  # not listed any more, or pending / requeued / finished: its processes are gone


# --- the lock file ------------------------------------------------------------------------------------------

def lock_path(target: Path) -> Path:
    """The lock file of `target`: `.<name>.lock` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _read(path: Path) -> tuple[bytes, os.stat_result] | None:
    """The raw content and stat of a lock file, None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(65536), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


def read_lock(target: Path) -> LockInfo | None:
    """Who holds the lock of `target`, or None when nobody does (or the lock file cannot be read)."""
    found = _read(lock_path(target))
    return LockInfo.from_json(found[0]) if found else None


def _unique(lock: Path, kind: str) -> Path:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", HOST)[:40]
    return lock.with_name(f"{lock.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{kind}.tmp")


def _try_create(lock: Path, content: bytes) -> tuple[bool, float]:
    """Create the lock file with `content` if there is none. Returns (created, the file server's clock now)."""
    tmp = _unique(lock, "new")
    try:
        with open(tmp, "xb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        now = os.stat(tmp).st_mtime
        try:
            os.link(tmp, lock)
            linked = True
        except OSError as exc:
            # On NFS a retransmitted link may fail although the first one succeeded: the link count tells.
            linked = os.stat(tmp).st_nlink == 2
            if not linked and not isinstance(exc, FileExistsError):
                if exc.errno not in UNSUPPORTED_LINK:
                    raise
                return _create_exclusive(lock, content), now
        if not linked:
            return False, now
        found = _read(lock)
        return bool(found and found[0] == content), now
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _create_exclusive(lock: Path, content: bytes) -> bool:
    """For file systems without hard links: O_EXCL (atomic on local disks and NFSv3+)."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_away(lock: Path, expected: bytes) -> bool:
    """Remove the lock file if it still holds `expected`; atomic against others doing the same.

    The file is renamed to a unique name first: of several processes doing this, one rename wins. If what was
    renamed is not what we judged (someone replaced it meanwhile), it is linked back.
    """
    aside = _unique(lock, "old")
    with uninterrupted():  # a stop between the rename and the unlink would leave the aside name behind
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return False
        try:
            found = _read(aside)
            if found and found[0] == expected:
                return True
            try:
                os.link(aside, lock)  # not the one we judged: put it back unless a new one is there already
            except OSError:
                pass
            return False
        finally:
            try:
                aside.unlink()
            except OSError:
                pass


def _remove_leftovers(lock: Path, now: float, older_than: float) -> None:
    """Temp files of lock attempts killed halfway (kept for the sake of other hosts' slow clocks)."""
    try:
        candidates = list(lock.parent.glob(f"{glob.escape(lock.name)}.*.tmp"))
    except OSError:
        return
    for path in candidates:
        try:
            if now - path.stat().st_mtime > older_than:
                path.unlink()
        except OSError:
            pass


def _stale_reason(info: LockInfo | None, age: float, stale_after: float) -> str | None:
    """Why the lock's writer is gone, or None when it may still be writing."""
    if info is None:
        limit = min(UNREADABLE_AFTER, stale_after)
        return f"unreadable lock file not modified for {age:.0f} s" if age > limit else None
    if info.host == HOST:
        boot = _boot_id()
        if info.boot and boot and info.boot != boot:
            return f"{HOST} rebooted since"
        if not pid_alive(info.pid):
            return f"pid {info.pid} is gone"
        stat = proc_stat(info.pid)
        if info.start is not None and stat and stat[1] != info.start:
            return f"pid {info.pid} now belongs to another process"
        if info.pid == os.getpid() and (stat is None or info.start == stat[1]):
            return "left behind by this process"  # not in our registry: a release that failed
        return None
    ours = os.environ.get("SLURM_JOB_ID")
    if info.job and info.slurm_job != ours:
        gone = _job_gone(info.job)
        if gone is False:
            return None
        if gone:
            stopped = 2 * info.heartbeat
            return f"SLURM job {info.job} is no longer running" if age > stopped else None
    limit = max(stale_after, 2 * info.heartbeat)
    if age > limit:
        return f"no heartbeat for {age:.0f} s (limit {limit:.0f} s, SNOWPIPE_LOCK_STALE_AFTER)"
    return None


# --- holding -----------------------------------------------------------------------------------------------

class _Held:
    """A lock this process holds: its content, how many blocks hold it, the heartbeat thread."""

    def __init__(self, lock: Path, info: LockInfo, content: bytes, heartbeat: float) -> None:
        self.lock = lock
        self.info = info
        self.content = content
        self.depth = 1
        self.stop = threading.Event()
        self.lost = False
        self.thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                       name=f"heartbeat {lock.name}")
        self.thread.start()

    def _beat(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                found = _read(self.lock)
                if not found or found[0] != self.content:
                    self.lost = True
                    now = LockInfo.from_json(found[0]) if found else None
                    by = f": now held by {now.what}, {now.holder()}" if now else ""
                    say(f"warning: lost the lock {self.lock}{by}; outputs of {self.info.what} may be mixed")
                    return
                os.utime(self.lock)
            except OSError:
                pass  # a flaky file server: try again next beat

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if self.lost:
            return
        try:
            faults.reached(f"releasing {self.lock.name}")
            _take_away(self.lock, self.content)
        except OSError as exc:  # left behind, it names a dead pid: the next writer breaks it
            say(f"warning: could not remove the lock {self.lock}: {exc.strerror or exc}")


_registry: dict[str, _Held] = {}  # the locks this process holds, by lock file
_serial: dict[str, threading.Lock] = {}  # per lock file: one thread at a time takes or releases it
_registry_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _registry_lock
    _registry.clear()  # a forked child holds nothing: its pid is not the one in the lock files
    _serial.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def output_lock(target: Path, what: str) -> Iterator[LockInfo]:
    """Hold the lock of `target` (a stage folder or a scene folder, which may not exist yet) while writing it.

    Waits while a live writer holds it (see the module's docstring); raises LockBusy when SNOWPIPE_LOCK_TIMEOUT
    runs out. Yields what the lock file says about us.
    """
    lock = Path(os.path.abspath(lock_path(Path(target))))  # a later chdir must not lose it
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = output_error(exc, lock.parent)
        if error is None and exc.errno in (errno.ENOTDIR, errno.EEXIST):
            error = OutputError(f"cannot create the folder {lock.parent}: a file is in the way; "
                                "move it or point the config's paths elsewhere")
        if error is None:  # e.g. a path under /proc or a parent that cannot hold folders
            error = OutputError(f"cannot create the folder {lock.parent}: {exc.strerror or exc}; "
                                "point the config's paths elsewhere")
        raise error from exc
    key = os.path.join(os.path.realpath(lock.parent), lock.name)  # one lock however the path is spelt
    with _registry_lock:
        serial = _serial.setdefault(key, threading.Lock())
    # A stop signal waits until the lock is both ours and registered, and until a release is done: otherwise
    # it could land between the lock file's creation and this `try`, or inside the release, and leave a lock
    # that names a live pid (pipeline/interrupts.py). Waits (for another thread, for a live holder) stay open.
    held: _Held | None = None
    try:
        with uninterrupted():
            while not serial.acquire(timeout=0.2):  # one thread of ours at a time takes or releases it
                with interruptible():
                    pass  # a stop that came while another thread of ours held it: raised here, holding nothing
            try:
                found = _registry.get(key)
                if found is not None:
                    found.depth += 1
                else:
                    try:
                        found = _acquire(lock, Path(target), what)
                    except OSError as exc:  # a read-only or full folder, another user's lock we may not touch
                        error = output_error(OSError(exc.errno, exc.strerror), lock.parent)  # the folder, not a temp
                        if error is None:
                            raise
                        raise error from exc
                    _registry[key] = found
                held = found
            finally:
                serial.release()
        yield held.info
    finally:
        if held is not None:
            with uninterrupted(), serial:
                held.depth -= 1
                if held.depth == 0:
                    _registry.pop(key, None)
                    held.release()


def release_abandoned() -> list[Path]:
    """Release every lock this process still holds although the blocks that took it have ended; the lock files.

    Called when a command or a pool task ends, after every `output_lock` block has closed. A stop signal that
    lands in the few bytecodes between the end of a lock's block and the start of its release (before
    `uninterrupted()` is entered) skips the release; the lock stays in the registry, and is released here
    rather than left behind naming this pid until the next writer breaks it.
    """
    with uninterrupted(), _registry_lock:
        abandoned = list(_registry.items())
        _registry.clear()
        for _key, held in abandoned:
            held.depth = 0
            held.release()
    return [held.lock for _key, held in abandoned]


def _acquire(lock: Path, target: Path, what: str) -> _Held:
    timeout = _seconds("SNOWPIPE_LOCK_TIMEOUT", None)
    heartbeat = _positive("SNOWPIPE_LOCK_HEARTBEAT", HEARTBEAT)
    stale_after = _positive("SNOWPIPE_LOCK_STALE_AFTER", STALE_AFTER)
    poll = _positive("SNOWPIPE_LOCK_POLL", POLL)
    poll_max = max(poll, _positive("SNOWPIPE_LOCK_POLL_MAX", POLL_MAX))
    deadline = None if timeout is None else time.monotonic() + timeout
    announced: str | None = None  # the token of the holder we said we wait for
    cleaned = False
    while True:
        info = _our_info(what, heartbeat)
        content = info.to_json()
        created, now = _try_create(lock, content)
        if created:
            faults.reached(f"took {lock.name}")
            return _Held(lock, info, content, heartbeat)
        with interruptible():  # nothing is ours yet: a stop may land anywhere while we look and wait
            if not cleaned:
                _remove_leftovers(lock, now, max(stale_after, 2 * heartbeat))
                cleaned = True
            found = _read(lock)
            if found is None:
                continue  # released meanwhile: try again at once
            raw, stat = found
            holder = LockInfo.from_json(raw)
            reason = _stale_reason(holder, now - stat.st_mtime, stale_after)
            if reason is not None:
                if _take_away(lock, raw):
                    whose = f"{holder.what}, {holder.holder()}" if holder else "unreadable"
                    say(f"broke the stale lock of {target} ({whose}): {reason}")
                continue
            if deadline is not None and time.monotonic() >= deadline:
                by = f"{holder.what}, {holder.holder()}" if holder else "a writer whose lock file cannot be read"
                raise LockBusy(f"{target} is being written by {by}; gave up after SNOWPIPE_LOCK_TIMEOUT="
                               f"{timeout:g} s: wait for it to finish, or if that process is gone, delete {lock}")
            if holder is not None and holder.token != announced:
                say(f"waiting for {holder.what} of {target}: held by {holder.holder()}")
                announced = holder.token
            pause = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            poll = min(poll * 1.5, poll_max)
