"""The state of a run's jobs: one `sacct` for all of them when accounting is on; otherwise `squeue`, then
`scontrol show job` for jobs that just left the queue, then the exit markers the batch scripts write into
the run folder (so a job SLURM has forgotten after MinJobAge still shows its true final state).
Array tasks are listed one by one. `slurm_parsers` builds those commands and reads what they print; this module
runs them and decides which record fills which row.

Accounting lags behind the queue: right after sbatch it may not know a job, and after a requeue it may still show
how the job's previous start ended. So the queue is asked whenever accounting leaves a task unknown or calls one
ended other than COMPLETED, and a task the queue still lists is not ended. A task no source lists within
`LISTED_WITHIN_S` of its submission is SUBMITTED (not yet listed), never UNKNOWN, so a fresh run is not called
failed. A pending task's Reason=Dependency is checked against the tasks it waits for (see `explain_waits`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # paramiko loads only when a command connects
    from pipeline.monitor.ssh import ClusterConnection
from pipeline.contract import formats
from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import slurm_parsers, stagejobs
from pipeline.monitor.slurm_parsers import JobRecord, expand_tasks

__all__ = ["FAILED_STATES", "NOT_DONE", "SUBMITTED", "JobSummary", "TaskState", "by_stage_job", "exit_code",
           "expand_tasks", "expected_tasks", "explain_waits", "from_exit_markers", "from_sacct", "from_scontrol",
           "from_squeue", "last_log_lines", "not_listed_yet", "query", "summary"]

SUBMITTED = "SUBMITTED"
"""snowpipe's word, not SLURM's: sbatch accepted the task moments ago and no SLURM command lists it yet."""
LISTED_WITHIN_S = 300.0
"""slurmctld keeps an ended job at least MinJobAge (300 s by default) after it ended, hence after it was submitted:
a task that no source lists this soon after its submission has not been forgotten, it is not listed yet."""
NOT_DONE = {"PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING",
            "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", SUBMITTED}


@dataclass
class TaskState:
    name: str
    id: str              # the job id (array job id for array tasks)
    task: int | None     # array task index
    state: str
    elapsed: str = ""
    node: str = ""
    exit_code: str = ""
    reason: str = ""
    log: str = ""        # path of its output on the cluster
    last_line: str = ""
    chunk_of: str | None = None  # the stage job this task's job is a chunk of (see `stagejobs`)

    @property
    def key(self) -> str:
        return f"{self.id}_{self.task}" if self.task is not None else self.id

    @property
    def done(self) -> bool:
        return self.state not in NOT_DONE and self.state != "UNKNOWN"

    def as_dict(self) -> dict[str, str | int | None]:
        return asdict(self)


def expected_tasks(record: RunRecord) -> list[TaskState]:
    """Every job and array task of the run, as UNKNOWN until a query says otherwise."""
    rows = []
    for job in record.jobs:
        tasks: list[int | None] = list(expand_tasks(job.array)) if job.array else [None]
        for task in tasks:
            rows.append(TaskState(job.name, job.id, task, "UNKNOWN", log=job.log_of(task),
                                  chunk_of=stagejobs.chunk_of(job)))
    return rows


def _apply(rows: dict[str, dict[int | None, TaskState]], record: JobRecord) -> None:
    """Set the fields of the rows a record covers, those the command reports. A range record (`12_[3-9]`, the
    pending rest of an array) only fills tasks no record of their own has described: accounting keeps it after
    tasks start. Rows are found by task index (a 2,000-task run's records, each one task, in linear time)."""
    values = {"state": record.state, "elapsed": record.elapsed, "node": record.node, "reason": record.reason}
    if record.exit_code is not None:
        values["exit_code"] = record.exit_code
    by_task = rows.get(record.job, {})
    covered = list(by_task.values()) if record.tasks is None else [
        by_task[task] for task in record.tasks if task in by_task]
    for row in covered:
        if record.is_range and row.state != "UNKNOWN":
            continue
        for name, value in values.items():
            setattr(row, name, value)


def _by_task(rows: list[TaskState]) -> dict[str, dict[int | None, TaskState]]:
    """Rows by job id, then array task index (None for a job that is no array)."""
    indexed: dict[str, dict[int | None, TaskState]] = {}
    for row in rows:
        indexed.setdefault(row.id, {})[row.task] = row
    return indexed


def _by_job(rows: list[TaskState]) -> dict[str, list[TaskState]]:
    grouped: dict[str, list[TaskState]] = {}
    for row in rows:
        grouped.setdefault(row.id, []).append(row)
    return grouped


def from_sacct(remote: ClusterConnection, rows: list[TaskState]) -> bool:
    """Fill states from accounting; False when sacct is not usable on this cluster."""
    result = remote.run(slurm_parsers.sacct_command(sorted({row.id for row in rows})))
    if result.code != 0:
        return False
    indexed = _by_task(rows)
    for record in sorted(slurm_parsers.parse_sacct(result.stdout), key=lambda record: record.is_range):  # ranges last
        _apply(indexed, record)
    return True


def from_squeue(remote: ClusterConnection, rows: list[TaskState]) -> bool:
    """Fill every task the queue lists: it lists only tasks that have not ended, so one that another source
    called ended is back in it (a requeue) or accounting is behind, and a pending one gets the queue's reason.
    False when squeue fails."""
    result = remote.run(slurm_parsers.squeue_command(sorted({row.id for row in rows})))
    if result.code != 0 and "Invalid job id" not in result.stderr:
        return False
    called_ended = {row.key for row in rows if row.done}
    indexed = _by_task(rows)  # the queue is the fresher word on every task it lists (state, and why one waits)
    for record in slurm_parsers.parse_squeue(result.stdout):
        _apply(indexed, record)
    for row in rows:
        if row.key in called_ended and row.state in NOT_DONE:
            row.exit_code = ""  # the exit code of an earlier start, not of this one
    return True


def from_scontrol(remote: ClusterConnection, rows: list[TaskState]) -> None:
    """Jobs that left squeue but not yet slurmctld's memory (MinJobAge): one scontrol call per job. Only a record
    of the row's own job or task fills it (a pending range does not)."""
    grouped = _by_job(rows)
    for job_id, tasks in grouped.items():
        if all(row.state != "UNKNOWN" for row in tasks):
            continue
        result = remote.run(slurm_parsers.scontrol_command(job_id))
        for record in slurm_parsers.parse_scontrol(result.stdout):
            for row in tasks:
                if row.state == "UNKNOWN" and row.key == record.job_id:
                    row.state, row.elapsed, row.node = record.state, record.elapsed, record.node
                    row.exit_code, row.reason = record.exit_code or "", record.reason


def from_exit_markers(remote: ClusterConnection, record: RunRecord, rows: list[TaskState]) -> None:
    """The exit markers the batch scripts' cleanup writes: the final word for forgotten jobs."""
    unknown = [row for row in rows if row.state == "UNKNOWN"]
    if not unknown:
        return
    folder = f"{record.remote_dir}/{formats.LOG_FOLDER}"
    result = remote.run(["bash", "-c", f'cat "$1"/{formats.EXIT_MARKER_GLOB} 2>/dev/null; true', "markers", folder])
    parsed = (formats.parse_exit_marker(line) for line in result.stdout.splitlines())
    markers = {marker.task: marker for marker in parsed if marker is not None}
    for row in unknown:
        marker = markers.get(row.key)
        if marker:
            row.state = marker.state
            row.exit_code = f"{marker.exit_code}:0"
            row.node = marker.node
            row.reason = "from the exit marker (job left the queue)"


def _age_s(stamp: str, now: datetime) -> float | None:
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return (now - (when if when.tzinfo else when.replace(tzinfo=timezone.utc))).total_seconds()


def not_listed_yet(record: RunRecord, rows: list[TaskState], now: datetime | None = None) -> None:
    """Tasks no source knows, submitted less than `LISTED_WITHIN_S` ago: SUBMITTED, not UNKNOWN (which `summary`
    counts as a failure). The job's own submission time, else the run's (records older than the job's)."""
    now = now or datetime.now(timezone.utc)
    submitted = {job.id: job.submitted or record.submitted for job in record.jobs}
    for row in rows:
        if row.state != "UNKNOWN":
            continue
        age = _age_s(submitted.get(row.id, ""), now)
        if age is not None and age < LISTED_WITHIN_S:
            row.state = SUBMITTED
            row.reason = f"submitted {max(age, 0):.0f} s ago; SLURM does not list it yet"


def _ended_as(rows: list[TaskState]) -> str:
    """`decode FAILED, train CANCELLED`: how the tasks ended, one entry per job and state."""
    return ", ".join(sorted({f"{row.name} {row.state}" for row in rows}))


def _unique(rows: list[TaskState]) -> list[TaskState]:
    """One row per job and state: what a reason names (a 1,000-task chunk that failed is one cause, not 1,000)."""
    return list({(row.id, row.name, row.state): row for row in rows}.values())


@dataclass
class _Awaited:
    """What a pending task waits for, as `explain_waits` judges it."""

    ended: list[TaskState]      # ended other than COMPLETED (one per job and state)
    stuck: list[TaskState]      # never start themselves (one per job)
    completed: bool             # every one COMPLETED (and there is at least one)


def explain_waits(record: RunRecord, rows: list[TaskState]) -> None:
    """A pending task's Reason=Dependency or DependencyNeverSatisfied, said from the run's own rows: SLURM keeps
    `Dependency` until its next scheduling pass after the tasks it waited for ended, and names none of them.

    - every task it waits for COMPLETED: it is starting (waiting for the scheduler and a free node);
    - one of them ended otherwise, or never starts itself, or SLURM says DependencyNeverSatisfied: it never
      starts, and the reason says how to cancel it;
    - otherwise SLURM's reason stands: it really waits.

    A whole job awaited is judged once (its rows come before those of the jobs that wait for it), so a run of
    thousands of pending tasks is explained in linear time."""
    tasks = _by_task(rows)
    jobs = {job.id: job for job in record.jobs}
    never: set[str] = set()  # keys of tasks that never start; jobs come after those they wait for
    whole: dict[str, _Awaited] = {}

    def judged(group: list[TaskState]) -> _Awaited:
        return _Awaited(_unique([other for other in group if other.done and other.state != "COMPLETED"]),
                        _unique([other for other in group if other.key in never]),
                        bool(group) and all(other.state == "COMPLETED" for other in group))

    def awaited(job_id: str, task: int | None, each: bool) -> _Awaited:
        of_job = tasks.get(job_id, {})
        if each and task is not None:
            return judged([of_job[task]] if task in of_job else [])
        if job_id not in whole:
            whole[job_id] = judged(list(of_job.values()))
        return whole[job_id]

    for row in rows:
        job = jobs.get(row.id)
        waits = row.reason in (slurm_parsers.WAITS_FOR_DEPENDENCY, slurm_parsers.NEVER_SATISFIED)
        if job is None or row.state != "PENDING" or not waits:
            continue
        views = [awaited(job_id, row.task, job_id in job.after_each) for job_id in job.after]
        ended = [other for view in views for other in view.ended]
        stuck = [other for view in views for other in view.stuck]
        if ended or stuck or row.reason == slurm_parsers.NEVER_SATISFIED:
            never.add(row.key)
            whole_job = row.task is None or any(other.id not in job.after_each for other in ended + stuck)
            cancel = f"snowpipe cancel {record.run_id} {row.name if whole_job else row.key} --yes"
            causes = ([f"{_ended_as(ended)} did not complete"] if ended else []) + (
                [f"{', '.join(sorted({other.name for other in stuck}))} never starts"] if stuck else [])
            why = " and ".join(causes) or "a job it waited for did not complete"
            row.reason = f"{stagejobs.NEVER_STARTS} ({row.reason}): {why}; cancel it: {cancel}"
        elif all(job_id in tasks for job_id in job.after) and views and all(view.completed for view in views):
            names = sorted({jobs[job_id].name for job_id in job.after if job_id in jobs})
            row.reason = (f"starting: {', '.join(names)} completed (SLURM says {row.reason} until its next "
                          f"scheduling pass)")


LOG_ARGUMENTS_BYTES = 64 * 1024
"""The most bytes of log paths one command carries: sshd hands the whole command line to the login shell as one
argument, which Linux caps at 128 KiB (MAX_ARG_STRLEN); a 2,000-task run's paths take several commands."""


def last_log_lines(remote: ClusterConnection, rows: list[TaskState]) -> None:
    """The last line of every task's output, in as few commands as the command line allows."""
    script = ('for f in "$@"; do l=$(tail -c 2000 "$f" 2>/dev/null | tr "\\r" "\\n" | grep -v "^\\s*$" '
              '| tail -n 1); printf "%s\\t%s\\n" "$f" "$l"; done')
    logs = list(dict.fromkeys(row.log for row in rows if row.log))
    lines: dict[str, str] = {}
    batches: list[list[str]] = [[]]
    size = 0
    for log in logs:
        if batches[-1] and size + len(log) + 3 > LOG_ARGUMENTS_BYTES:  # + quotes and a space
            batches.append([])
            size = 0
        batches[-1].append(log)
        size += len(log) + 3
    for batch in filter(None, batches):
        result = remote.run(["bash", "-c", script, "logs", *batch])
        for line in result.stdout.splitlines():
            path, tab, last = line.partition("\t")
            if tab:
                lines[path] = last
    for row in rows:
        row.last_line = lines.get(row.log, "")[:200]


def query(remote: ClusterConnection, record: RunRecord, use_sacct: bool = True, now: datetime | None = None,
          ) -> tuple[list[TaskState], str]:
    """States of every task of the run, and which source answered ("sacct" or "squeue")."""
    rows = expected_tasks(record)
    source = "sacct"
    if not (use_sacct and from_sacct(remote, rows)):
        source = "squeue"
    # No accounting; or it lags behind a fresh job, or calls ended one the queue holds again (a requeue).
    # A pending task's reason (Dependency, Resources) is the queue's: accounting often leaves it empty.
    if any(row.state == "UNKNOWN" or (row.done and row.state != "COMPLETED") or
           (row.state == "PENDING" and not row.reason) for row in rows):
        if not from_squeue(remote, rows) and source == "squeue":
            raise SnowpipeError(f"neither sacct nor squeue works on {record.host}: is it a SLURM login node? "
                                f"(check with: ssh {record.login_address} squeue)")
        from_scontrol(remote, rows)
    from_exit_markers(remote, record, rows)
    not_listed_yet(record, rows, now)
    explain_waits(record, rows)
    last_log_lines(remote, rows)
    return rows, source


FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def summary(rows: list[TaskState]) -> str:
    """One word for the run: RUNNING / PENDING while any task is not done, then FAILED, CANCELLED, COMPLETED."""
    states = {row.state for row in rows}
    if states & NOT_DONE:
        return "RUNNING" if states & {"RUNNING", "COMPLETING", "CONFIGURING"} else "PENDING"
    if states == {"COMPLETED"}:
        return "COMPLETED"
    if states & FAILED_STATES:
        return "FAILED"
    return "CANCELLED" if "CANCELLED" in states else "UNKNOWN"


@dataclass
class JobSummary:
    """One stage job of a run (all its chunks): counts per state over its tasks, and the tasks to look at."""

    name: str
    ids: list[str]
    chunks: int              # array jobs it was split into; 1 when it was not
    state: str               # `summary` of its tasks
    counts: dict[str, int]   # tasks per state
    flagged: list[TaskState]  # every task that ended otherwise than COMPLETED, is not known, or never starts
    rows: list[TaskState]

    @property
    def tasks(self) -> int:
        return len(self.rows)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "ids": self.ids, "chunks": self.chunks, "tasks": self.tasks, "state": self.state,
                "counts": self.counts, "flagged": [row.key for row in self.flagged]}


def by_stage_job(record: RunRecord, rows: list[TaskState]) -> list[JobSummary]:
    """The run's rows as one entry per stage job (its chunks together), in record order."""
    of_job = _by_job(rows)
    summaries = []
    for stage in stagejobs.stage_jobs(record):
        mine = [row for job_id in dict.fromkeys(stage.ids) for row in of_job.get(job_id, [])]
        summaries.append(JobSummary(
            stage.name, stage.ids, len(stage.jobs), summary(mine) if mine else "UNKNOWN",
            stagejobs.ordered_counts([row.state for row in mine]),
            [row for row in mine if stagejobs.is_flagged(row.state, row.reason)], mine))
    return summaries


STILL_RUNNING = 3  # `snowpipe status` exit code while a task is pending or running (the wait loop polls for it)


def exit_code(rows: list[TaskState]) -> int:
    """0 when every task completed, 3 while any is not done, 1 otherwise."""
    state = summary(rows)
    return {"COMPLETED": formats.EXIT_OK, "RUNNING": STILL_RUNNING, "PENDING": STILL_RUNNING}.get(
        state, formats.EXIT_FAILED)
