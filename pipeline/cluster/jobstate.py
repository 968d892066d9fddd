"""The state of a run's jobs: one `sacct` for all of them when accounting is on; otherwise `squeue`, then
`scontrol show job` for jobs that just left the queue, then the exit markers the batch scripts write into
the run folder (so a job SLURM has forgotten after MinJobAge still shows its true final state).
Array tasks are listed one by one."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # paramiko loads only when a command connects
    from pipeline.cluster.ssh import Remote
from pipeline.errors import SnowpipeError

NOT_DONE = {"PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING",
            "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
FIELDS = "JobID,JobName,State,Elapsed,NodeList,ExitCode,Reason"


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_tasks(spec: str) -> list[int]:
    """`0-3,7` or `[0-3%2]` -> [0, 1, 2, 3, 7]."""
    spec = spec.strip("[]").split("%")[0]
    tasks: list[int] = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        tasks.extend(range(int(low), int(high or low) + 1))
    return tasks


def expected_tasks(record: dict[str, Any]) -> list[TaskState]:
    """Every job and array task of the run, as UNKNOWN until a query says otherwise."""
    rows = []
    for job in record["jobs"]:
        for task in expand_tasks(job["array"]) if job.get("array") else [None]:
            log = job.get("log", "").replace("%x", job["name"]).replace("%A", job["id"]).replace("%j", job["id"])
            log = log.replace("%a", str(task))
            rows.append(TaskState(job["name"], job["id"], task, "UNKNOWN", log=log))
    return rows


def _split_id(job_id: str) -> tuple[str, list[int] | None]:
    match = re.fullmatch(r"(\d+)(?:_(\[[^\]]+\]|\d+))?(?:\+\d+)?", job_id)
    if not match:
        return job_id, None
    return match[1], expand_tasks(match[2]) if match[2] else None


def _apply(rows: dict[str, list[TaskState]], job_id: str, **values: str) -> None:
    """Set the fields of the rows a SLURM id covers. A range record (`12_[3-9]`, the pending rest of an
    array) only fills tasks no record of their own has described: accounting keeps it after tasks start."""
    base, tasks = _split_id(job_id)
    is_range = "[" in job_id
    for row in rows.get(base, []):
        if tasks is None or row.task in tasks:
            if is_range and row.state != "UNKNOWN":
                continue
            for name, value in values.items():
                setattr(row, name, value)


def _by_job(rows: list[TaskState]) -> dict[str, list[TaskState]]:
    grouped: dict[str, list[TaskState]] = {}
    for row in rows:
        grouped.setdefault(row.id, []).append(row)
    return grouped


def from_sacct(remote: Remote, rows: list[TaskState]) -> bool:
    """Fill states from accounting; False when sacct is not usable on this cluster."""
    ids = ",".join(sorted({row.id for row in rows}))
    result = remote.run(["sacct", "--jobs", ids, "--allocations", "--noheader", "--parsable2", f"--format={FIELDS}"])
    if result.code != 0:
        return False
    grouped = _by_job(rows)
    lines = sorted(result.stdout.splitlines(), key=lambda line: "[" in line.split("|")[0])  # ranges last
    for line in lines:
        parts = line.split("|")
        if len(parts) != 7:
            continue
        job_id, _, state, elapsed, node, exit_code, reason = parts
        _apply(grouped, job_id, state=state.split()[0], elapsed=elapsed, node=node if node != "None assigned" else "",
               exit_code=exit_code, reason="" if reason == "None" else reason)
    return True


def from_squeue(remote: Remote, rows: list[TaskState]) -> bool:
    ids = ",".join(sorted({row.id for row in rows}))
    result = remote.run(["squeue", "--noheader", "--array", "--jobs", ids, "--format=%i|%T|%M|%N|%r"])
    if result.code != 0 and "Invalid job id" not in result.stderr:
        return False
    grouped = _by_job(rows)
    for line in result.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            job_id, state, elapsed, node, reason = parts
            _apply(grouped, job_id, state=state, elapsed=elapsed, node=node, reason="" if reason == "None" else reason)
    return True


def from_scontrol(remote: Remote, rows: list[TaskState]) -> None:
    """Jobs that left squeue but not yet slurmctld's memory (MinJobAge): one scontrol call per job."""
    grouped = _by_job(rows)
    for job_id, tasks in grouped.items():
        if all(row.state != "UNKNOWN" for row in tasks):
            continue
        result = remote.run(["scontrol", "--oneliner", "show", "job", job_id])
        for line in result.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            task_id = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId', job_id)}_{task_id}" if task_id else fields.get("JobId", job_id)
            for row in tasks:
                if row.state == "UNKNOWN" and (row.key == key or (row.task is None and key == job_id)):
                    row.state = fields.get("JobState", "UNKNOWN")
                    row.elapsed = fields.get("RunTime", "")
                    row.node = fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else ""
                    row.exit_code = fields.get("ExitCode", "")
                    row.reason = "" if fields.get("Reason") == "None" else fields.get("Reason", "")


def from_exit_markers(remote: Remote, record: dict[str, Any], rows: list[TaskState]) -> None:
    """The `.exit` markers the batch scripts' cleanup writes: the final word for forgotten jobs."""
    unknown = [row for row in rows if row.state == "UNKNOWN"]
    if not unknown:
        return
    result = remote.run(["bash", "-c", 'cat "$1"/logs/*.exit 2>/dev/null; true', "markers", record["remote_dir"]])
    markers = {}
    for line in result.stdout.splitlines():
        try:
            marker = json.loads(line)
            markers[marker["task"]] = marker
        except (json.JSONDecodeError, KeyError):
            continue
    for row in unknown:
        marker = markers.get(row.key)
        if marker:
            code = int(marker["exit_code"])
            row.state = "COMPLETED" if code == 0 else ("CANCELLED" if code in (130, 143) else "FAILED")
            row.exit_code = f"{code}:0"
            row.node = marker.get("node", "")
            row.reason = "from the exit marker (job left the queue)"


def last_log_lines(remote: Remote, rows: list[TaskState]) -> None:
    """The last line of every task's output, in one command."""
    script = ('for f in "$@"; do l=$(tail -c 2000 "$f" 2>/dev/null | tr "\\r" "\\n" | grep -v "^\\s*$" '
              '| tail -n 1); printf "%s\\t%s\\n" "$f" "$l"; done')
    result = remote.run(["bash", "-c", script, "logs", *[row.log for row in rows if row.log]])
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    for row in rows:
        row.last_line = lines.get(row.log, "")[:200]


def query(remote: Remote, record: dict[str, Any], use_sacct: bool = True) -> tuple[list[TaskState], str]:
    """States of every task of the run, and which source answered ("sacct" or "squeue")."""
    rows = expected_tasks(record)
    source = "sacct"
    if not (use_sacct and from_sacct(remote, rows)):
        source = "squeue"
    if any(row.state == "UNKNOWN" for row in rows):  # no accounting, or it lags behind a fresh job
        if not from_squeue(remote, rows) and source == "squeue":
            raise SnowpipeError(f"neither sacct nor squeue works on {record['host']}: is it a SLURM login node? "
                                f"(check with: ssh {record['address']} squeue)")
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


def exit_code(rows: list[TaskState]) -> int:
    """0 when every task completed, 3 while any is not done, 1 otherwise."""
    state = summary(rows)
    return {"COMPLETED": 0, "RUNNING": 3, "PENDING": 3}.get(state, 1)
