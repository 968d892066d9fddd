"""One writer at a time: output locks between real processes, real signals, real stale locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline import locks
from pipeline.errors import OutputError, SnowpipeError
from pipeline.locks import LockBusy, output_lock, read_lock
from tests.requirements import need_private_mounts

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A writer: takes the lock ROUNDS times, each time logging begin/end around HOLD seconds of "writing";
# with a GO file named, it starts only once that file exists (so several start at the same instant).
WRITER = """
import os, sys, time
from pathlib import Path
from pipeline.locks import output_lock
target, what, log, hold, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
go = Path(sys.argv[6]) if len(sys.argv) > 6 else None
while go is not None and not go.exists():
    time.sleep(0.001)
for _ in range(rounds):
    with output_lock(target, what):
        with open(log, "a") as f:
            f.write(f"begin {os.getpid()}\\n")
        print("locked", flush=True)
        time.sleep(hold)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()}\\n")
"""


@pytest.fixture(autouse=True)
def fast_locks(monkeypatch):
    """Short polls; no SLURM job of the test run itself; no real squeue unless a test names one."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SNOWPIPE_LOCK_TIMEOUT",
                 "SNOWPIPE_LOCK_STALE_AFTER", "SNOWPIPE_LOCK_HEARTBEAT", "SNOWPIPE_SQUEUE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SNOWPIPE_LOCK_POLL", "0.02")
    monkeypatch.setenv("SNOWPIPE_LOCK_POLL_MAX", "0.1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def writer(target: Path, log: Path, what: str = "annotate 2021-03-04", hold: float = 0.0,
           rounds: int = 1, go: Path | None = None) -> subprocess.Popen:
    args = [str(target), what, str(log), str(hold), str(rounds)] + ([str(go)] if go else [])
    return subprocess.Popen([sys.executable, "-c", WRITER, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_locked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()


def finish(proc: subprocess.Popen, timeout: float = 10) -> str:
    """Wait for a writer, assert success; its stderr."""
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


def assert_never_overlapping(log: Path, writes: int) -> list[str]:
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * writes, lines
    for begin, end in zip(lines[::2], lines[1::2]):
        assert begin.startswith("begin ") and end == "end " + begin.split()[1], lines
    return [line.split()[1] for line in lines[::2]]


def lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def proc_start(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant(target: Path, age: float = 0.0, **fields) -> Path:
    """A lock file as another writer would have left it, last refreshed `age` seconds ago."""
    content = {"host": "node-elsewhere", "pid": 4321, "start": 999, "boot": None, "slurm_job": None,
               "slurm_array_job": None, "slurm_array_task": None, "what": "annotate 2021-03-04",
               "started": "2021-03-04T05:06:07+00:00", "heartbeat": 30.0, "token": "planted"}
    content.update(fields)
    path = lock_file(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def fake_squeue(tmp_path: Path, output: str, rc: int = 0) -> Path:
    """A stand-in for the remote cluster's squeue (SNOWPIPE_SQUEUE points at it); logs its arguments."""
    script = tmp_path / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'squeue.calls'}\nprintf '{output}'\nexit {rc}\n")
    script.chmod(0o755)
    return script


# --- two writers ------------------------------------------------------------------------------------------

def test_a_second_writer_waits_and_takes_the_lock_when_the_first_releases(tmp_path):
    target, log = tmp_path / "results" / "dataset", tmp_path / "log"
    first = writer(target, log, what="dataset", hold=1.0)
    wait_locked(first)
    second = writer(target, log, what="dataset")
    finish(first)
    err = finish(second)
    order = assert_never_overlapping(log, 2)
    assert order == [str(first.pid), str(second.pid)]
    assert f"waiting for dataset of {target}: held by pid {first.pid} on {HOST} since " in err
    assert err.count("waiting for") == 1
    assert not lock_file(target).exists() and not target.exists()
    assert [p.name for p in target.parent.iterdir()] == []  # no temp files left


def test_many_writers_never_overlap(tmp_path):
    target, log = tmp_path / "annotations" / "2021-03-04", tmp_path / "log"
    go = tmp_path / "go"
    procs = [writer(target, log, hold=0.03, rounds=3, go=go) for _ in range(4)]
    time.sleep(0.3)
    go.touch()
    for proc in procs:
        finish(proc, timeout=30)
    assert sorted(set(assert_never_overlapping(log, 12))) == sorted(str(p.pid) for p in procs)
    assert list(target.parent.iterdir()) == []


# --- stale locks ------------------------------------------------------------------------------------------

def test_the_lock_of_a_writer_killed_with_sigkill_is_broken_at_once(tmp_path):
    target, log = tmp_path / "dataset", tmp_path / "log"
    victim = writer(target, log, what="dataset", hold=60)
    wait_locked(victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert lock_file(target).exists()
    started = time.monotonic()
    successor = writer(target, log, what="dataset")
    err = finish(successor)
    assert time.monotonic() - started < 3
    assert "waiting for" not in err
    assert f"broke the stale lock of {target} (dataset, pid {victim.pid} on {HOST} since " in err
    assert f"pid {victim.pid} is gone" in err
    assert log.read_text().splitlines() == [f"begin {victim.pid}", f"begin {successor.pid}", f"end {successor.pid}"]
    assert list(tmp_path.iterdir()) == [log]


def test_breakers_racing_for_one_stale_lock_let_only_one_win(tmp_path):
    target, log = tmp_path / "dataset", tmp_path / "log"
    plant(target, host=HOST, pid=dead_pid(), start=None)
    go = tmp_path / "go"
    procs = [writer(target, log, hold=0.05, go=go) for _ in range(5)]
    time.sleep(0.3)  # all started and waiting for the go
    go.touch()
    errs = [finish(proc, timeout=30) for proc in procs]
    assert_never_overlapping(log, 5)
    assert sum(err.count("broke the stale lock") for err in errs) == 1


def test_a_breaker_that_comes_late_never_removes_the_new_holder_s_lock(tmp_path):
    """Two breakers judged one stale lock; the first broke it and a writer took the lock since. The second's
    rename then catches the new lock: it must notice and put it back (the writer keeps it, nothing overlaps)."""
    target, log = tmp_path / "dataset", tmp_path / "log"
    stale = plant(target, host=HOST, pid=dead_pid(), start=None).read_bytes()
    assert locks._take_away(lock_file(target), stale)  # the first breaker
    holder = writer(target, log, hold=60)
    wait_locked(holder)
    taken = lock_file(target).read_bytes()
    assert not locks._take_away(lock_file(target), stale)  # the second breaker, late
    assert lock_file(target).read_bytes() == taken
    holder.send_signal(signal.SIGINT)
    holder.communicate(timeout=5)
    assert list(target.parent.iterdir()) == [log]  # released by its holder; no renamed copies left


def test_a_reused_pid_with_another_start_time_is_stale(tmp_path, monkeypatch, capsys):
    target = tmp_path / "scene"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        start = proc_start(sleeper.pid)
        plant(target, host=HOST, pid=sleeper.pid, start=start)  # the same process: alive
        monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.3")
        with pytest.raises(LockBusy):
            with output_lock(target, "annotate"):
                pass
        plant(target, host=HOST, pid=sleeper.pid, start=start + 12345)  # the pid now names another process
        with output_lock(target, "annotate") as mine:
            assert read_lock(target) == mine
    finally:
        sleeper.kill()
        sleeper.wait()
    err = capsys.readouterr().err
    assert f"pid {sleeper.pid} now belongs to another process" in err
    assert not lock_file(target).exists()


@pytest.mark.parametrize("output,rc", [("", 0), ("slurm_load_jobs error: Invalid job id specified\\n", 1),
                                       ("PENDING\\n", 0), ("COMPLETED\\n", 0)],
                         ids=["not listed", "invalid job id", "pending", "completed"])
def test_a_lock_of_another_host_whose_slurm_job_is_gone_is_broken(tmp_path, monkeypatch, capsys, output, rc):
    target = tmp_path / "dataset"
    monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, output, rc)))
    plant(target, age=120, slurm_job="4243", slurm_array_job="4242", slurm_array_task="1")
    with output_lock(target, "dataset"):
        pass
    err = capsys.readouterr().err
    assert "broke the stale lock" in err and "on node-elsewhere (SLURM job 4242_1)" in err
    assert "SLURM job 4242_1 is no longer running" in err
    assert (tmp_path / "squeue.calls").read_text().split() == ["-h", "-j", "4242_1", "-o", "%T"]


def test_a_gone_job_whose_heartbeat_still_moves_is_a_ghost_and_waited_for(tmp_path, monkeypatch):
    target = tmp_path / "dataset"
    monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, "")))
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.3")
    plant(target, age=5, slurm_job="4242")  # refreshed 5 s ago, heartbeat every 30 s
    with pytest.raises(LockBusy):
        with output_lock(target, "dataset"):
            pass


def test_a_lock_of_another_host_whose_slurm_job_runs_is_waited_for(tmp_path, monkeypatch):
    target = tmp_path / "dataset"
    monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, "RUNNING\\n")))
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.3")
    monkeypatch.setenv("SNOWPIPE_LOCK_STALE_AFTER", "60")
    lock = plant(target, age=3600, slurm_job="4242")  # squeue decides, even over an old heartbeat
    with pytest.raises(LockBusy) as caught:
        with output_lock(target, "dataset"):
            pass
    assert str(caught.value) == (
        f"{target} is being written by annotate 2021-03-04, pid 4321 on node-elsewhere (SLURM job 4242) since "
        "2021-03-04T05:06:07+00:00; gave up after SNOWPIPE_LOCK_TIMEOUT=0.3 s: wait for it to finish, or if that "
        f"process is gone, delete {lock}")
    assert caught.value.exit_code == 75 and isinstance(caught.value, SnowpipeError)
    assert json.loads(lock.read_text())["token"] == "planted"


@pytest.mark.parametrize("squeue", ["missing", "failing", "no job id", "our own job"])
def test_when_squeue_cannot_decide_the_heartbeat_age_does(tmp_path, monkeypatch, capsys, squeue):
    target = tmp_path / "scene"
    monkeypatch.setenv("SNOWPIPE_LOCK_STALE_AFTER", "100")
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.3")
    job = {"slurm_job": "4242"}
    if squeue == "missing":
        monkeypatch.setenv("SNOWPIPE_SQUEUE", str(tmp_path / "no-such-squeue"))
    elif squeue == "failing":  # e.g. slurmctld down
        monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, "slurm_load_jobs error: timeout", 1)))
    elif squeue == "no job id":
        monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, "")))
        job = {}
    else:  # a requeued job meets the lock of its previous run (its ghost): squeue would say "running"
        monkeypatch.setenv("SNOWPIPE_SQUEUE", str(fake_squeue(tmp_path, "RUNNING\\n")))
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    plant(target, age=50, **job)  # fresh: waited for
    with pytest.raises(LockBusy, match="pid 4321 on node-elsewhere"):
        with output_lock(target, "annotate"):
            pass
    plant(target, age=150, **job)  # older than SNOWPIPE_LOCK_STALE_AFTER: broken
    with output_lock(target, "annotate") as mine:
        assert mine.slurm_job == job.get("slurm_job") if squeue == "our own job" else mine.slurm_job is None
    err = capsys.readouterr().err
    assert "broke the stale lock" in err and "no heartbeat for 150 s (limit 100 s" in err
    if squeue in ("no job id", "our own job"):
        assert not (tmp_path / "squeue.calls").exists()


def test_an_unreadable_lock_file_is_broken_once_it_is_old(tmp_path, monkeypatch, capsys):
    target = tmp_path / "scene"
    lock = lock_file(target)
    lock.write_bytes(b"\x00\x01 not json")
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.2")
    with pytest.raises(LockBusy, match="whose lock file cannot be read"):
        with output_lock(target, "annotate"):
            pass
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with output_lock(target, "annotate"):
        pass
    assert "broke the stale lock of" in capsys.readouterr().err


# --- holding and releasing --------------------------------------------------------------------------------

def test_the_lock_file_names_its_holder_and_lies_beside_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    target = tmp_path / "not" / "yet" / "2021-03-04"
    with output_lock(target, "annotate 2021-03-04") as mine:
        assert sorted(p.name for p in target.parent.iterdir()) == [".2021-03-04.lock"]
        info = read_lock(target)
        raw = json.loads(lock_file(target).read_text())
    assert info == mine
    assert (raw["host"], raw["pid"], raw["start"]) == (HOST, os.getpid(), proc_start(os.getpid()))
    assert (raw["slurm_job"], raw["slurm_array_job"], raw["slurm_array_task"]) == ("1001", "1000", "1")
    assert info.job == "1000_1" and raw["what"] == "annotate 2021-03-04"
    started = datetime.fromisoformat(raw["started"])
    assert started.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - started) < timedelta(minutes=1)
    assert read_lock(target) is None and list(target.parent.iterdir()) == []


def test_the_heartbeat_moves_the_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("SNOWPIPE_LOCK_HEARTBEAT", "0.05")
    target = tmp_path / "dataset"
    with output_lock(target, "dataset"):
        lock = lock_file(target)
        os.utime(lock, (time.time() - 1000, time.time() - 1000))
        deadline = time.monotonic() + 3
        while time.time() - lock.stat().st_mtime > 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.stat().st_mtime < 10


def test_ctrl_c_of_a_writer_releases_its_lock(tmp_path):
    target, log = tmp_path / "dataset", tmp_path / "log"
    proc = writer(target, log, hold=60)
    wait_locked(proc)
    assert lock_file(target).exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=5)
    assert "KeyboardInterrupt" in err
    assert not lock_file(target).exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_exception_inside_the_block_releases_the_lock(tmp_path, error):
    target = tmp_path / "dataset"
    with pytest.raises(error):
        with output_lock(target, "dataset"):
            assert lock_file(target).exists()
            raise error
    assert list(tmp_path.iterdir()) == []


def test_a_lock_taken_over_by_another_writer_is_not_removed_on_release(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SNOWPIPE_LOCK_HEARTBEAT", "0.05")
    target = tmp_path / "dataset"
    with output_lock(target, "dataset"):
        plant(target, host=HOST, pid=os.getppid())  # e.g. broken by someone who judged ours stale
        deadline = time.monotonic() + 3
        while "lost the lock" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert f"warning: lost the lock {lock_file(target)}: now held by annotate 2021-03-04, pid {os.getppid()}" in err
    assert json.loads(lock_file(target).read_text())["token"] == "planted"


def test_asking_again_for_a_lock_this_process_holds_does_not_deadlock(tmp_path, monkeypatch):
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.5")  # a deadlock would show as LockBusy, not a hang
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    with output_lock(Path("real/dataset"), "dataset") as outer:
        with output_lock(tmp_path / "link" / "dataset", "dataset again") as inner:
            assert inner == outer
        assert read_lock(tmp_path / "real" / "dataset") == outer
        monkeypatch.chdir("/")  # a relative target is released where it was taken
    assert list((tmp_path / "real").iterdir()) == []


def test_a_child_process_does_not_inherit_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", "0.2")
    target, log = tmp_path / "dataset", tmp_path / "log"
    with output_lock(target, "dataset"):
        proc = writer(target, log)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "LockBusy" in err and f"held by pid {os.getpid()}" in err


def test_a_file_in_place_of_the_target_s_folder_is_one_clear_error(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(OutputError, match=f"cannot create the folder {tmp_path / 'results'}: a file is in the way"):
        with output_lock(tmp_path / "results" / "dataset", "dataset"):
            pass


TAKE = """
import sys
from pathlib import Path
from pipeline.errors import SnowpipeError
from pipeline.locks import output_lock
try:
    with output_lock(Path(sys.argv[1]), "dataset"):
        pass
except SnowpipeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("options,fill,reason", [("ro,size=64k", 0, "read-only file system"),
                                                 ("size=16k,nr_inodes=2", 1, "no space left")],
                         ids=["read-only", "full"])
def test_a_read_only_or_full_folder_is_one_clear_error(tmp_path, options, fill, reason):
    need_private_mounts()
    folder = tmp_path / "results"
    folder.mkdir()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; '
              'if [ "$3" = 1 ]; then dd if=/dev/zero of="$2/fill" bs=4k 2>/dev/null; fi; shift 3; exec "$@"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", options, str(folder), str(fill),
                             sys.executable, "-c", TAKE, str(folder / "dataset")],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 74, result.stderr
    assert result.stderr.startswith(f"error: cannot write {folder}: {reason}; "), result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_malformed_timeout_is_one_clear_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SNOWPIPE_LOCK_TIMEOUT", value)
    with pytest.raises(SnowpipeError, match=f"SNOWPIPE_LOCK_TIMEOUT='{value}' is not a number of seconds"):
        with output_lock(tmp_path / "dataset", "dataset"):
            pass


def test_a_lock_whose_release_a_stop_cut_short_is_released_when_the_task_ends(tmp_path):
    """A stop signal landing between the end of a lock's block and its (shielded) release skipped the release:
    the lock stayed behind, naming this pid. The block is cut short here by never closing it; the end of the
    pool task (run_task) and of the command (cli.main, through the same call) release what is left."""
    from pipeline.workers import run_task

    target = tmp_path / "32TNS_20220301T102309"
    never_closed = []  # kept alive: a collected block would close, and release, itself

    def cut_short() -> None:
        never_closed.append(output_lock(target, "annotate 32TNS_20220301T102309"))
        never_closed[-1].__enter__()  # taken, its block never ends
        assert lock_file(target).exists()

    run_task(cut_short)
    assert not lock_file(target).exists()
    assert locks.release_abandoned() == []  # nothing left to release

    never_closed.append(output_lock(target, "annotate again"))
    never_closed[-1].__enter__()
    assert locks.release_abandoned() == [Path(os.path.abspath(lock_file(target)))]
    assert not lock_file(target).exists()
    with output_lock(target, "the next writer") as info:  # taken at once: nothing stale to break
        assert info.what == "the next writer"
