"""The state of a run's jobs: one `sacct` for all of them when accounting is on; otherwise `squeue`, then
`scontrol show job` for jobs that just left the queue, then the exit markers the batch scripts write into
the run folder (so a job SLURM has forgotten after MinJobAge still shows its true final state).
Array tasks are listed one by one. `slurm_parsers` builds those commands and reads what they print; this module
runs them and decides which record fills which row."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # paramiko loads only when a command connects
    from pipeline.monitor.ssh import ClusterConnection
from pipeline.contract import formats
from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import slurm_parsers
from pipeline.monitor.slurm_parsers import JobRecord, expand_tasks

__all__ = ["FAILED_STATES", "NOT_DONE", "TaskState", "exit_code", "expand_tasks", "expected_tasks", "from_exit_markers",
           "from_sacct", "from_scontrol", "from_squeue", "last_log_lines", "query", "summary"]

NOT_DONE = {"PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING",
            "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


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
            rows.append(TaskState(job.name, job.id, task, "UNKNOWN", log=job.log_of(task)))
    return rows


def _apply(rows: dict[str, list[TaskState]], record: JobRecord) -> None:
    """Set the fields of the rows a record covers, those the command reports. A range record (`12_[3-9]`, the
    pending rest of an array) only fills tasks no record of their own has described: accounting keeps it after
    tasks start."""
    values = {"state": record.state, "elapsed": record.elapsed, "node": record.node, "reason": record.reason}
    if record.exit_code is not None:
        values["exit_code"] = record.exit_code
    for row in rows.get(record.job, []):
        if record.tasks is None or row.task in record.tasks:
            if record.is_range and row.state != "UNKNOWN":
                continue
            for name, value in values.items():
                setattr(row, name, value)


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
    grouped = _by_job(rows)
    for record in sorted(slurm_parsers.parse_sacct(result.stdout), key=lambda record: record.is_range):  # ranges last
        _apply(grouped, record)
    return True


def from_squeue(remote: ClusterConnection, rows: list[TaskState]) -> bool:
    result = remote.run(slurm_parsers.squeue_command(sorted({row.id for row in rows})))
    if result.code != 0 and "Invalid job id" not in result.stderr:
        return False
    grouped = _by_job(rows)
    for record in slurm_parsers.parse_squeue(result.stdout):
        _apply(grouped, record)
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


def last_log_lines(remote: ClusterConnection, rows: list[TaskState]) -> None:
    """The last line of every task's output, in one command."""
    script = ('for f in "$@"; do l=$(tail -c 2000 "$f" 2>/dev/null | tr "\\r" "\\n" | grep -v "^\\s*$" '
              '| tail -n 1); printf "%s\\t%s\\n" "$f" "$l"; done')
    result = remote.run(["bash", "-c", script, "logs", *[row.log for row in rows if row.log]])
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    for row in rows:
        row.last_line = lines.get(row.log, "")[:200]


def query(remote: ClusterConnection, record: RunRecord, use_sacct: bool = True) -> tuple[list[TaskState], str]:
    """States of every task of the run, and which source answered ("sacct" or "squeue")."""
    rows = expected_tasks(record)
    source = "sacct"
    if not (use_sacct and from_sacct(remote, rows)):
        source = "squeue"
    if any(row.state == "UNKNOWN" for row in rows):  # no accounting, or it lags behind a fresh job
        if not from_squeue(remote, rows) and source == "squeue":
            raise SnowpipeError(f"neither sacct nor squeue works on {record.host}: is it a SLURM login node? "
                                f"(check with: ssh {record.login_address} squeue)")
        from_scontrol(remote, rows)
    from_exit_markers(remote, record, rows)
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


STILL_RUNNING = 3  # `snowpipe status` exit code while a task is pending or running (the wait loop polls for it)


def exit_code(rows: list[TaskState]) -> int:
    """0 when every task completed, 3 while any is not done, 1 otherwise."""
    state = summary(rows)
    return {"COMPLETED": formats.EXIT_OK, "RUNNING": STILL_RUNNING, "PENDING": STILL_RUNNING}.get(
        state, formats.EXIT_FAILED)
