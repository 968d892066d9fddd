"""What SLURM's client commands print, read into plain records: the one module that knows their output formats.

Each `*_command` builds the argv `jobstate` runs (on the login node, over SSH); each `parse_*` reads the stdout of
exactly that command and nothing else: no SSH, no SLURM, no run record, so tests feed them captured output
(tests/fixtures/slurm/). Which record wins for which task of a run is `jobstate`'s business, not theirs.

Job ids come as SLURM prints them: `12` (a job), `12_3` (array task 3), `12_[4-9%2]` (the pending rest of an
array, throttled to 2 at a time), `12+1` (a heterogeneous job's component, counted as job 12). Job steps
(`12.batch`, `12.extern`, `12.0`) are not jobs and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SACCT_FIELDS = "JobID,JobName,State,Elapsed,NodeList,ExitCode,Reason"
"""`sacct --format`; `parse_sacct` reads these seven columns in this order."""
SQUEUE_FORMAT = "%i|%T|%M|%N|%r"
"""`squeue --format`: job id, state (long name), elapsed, nodes, reason."""

WAITS_FOR_DEPENDENCY = "Dependency"
"""The reason of a job that waits for others. slurmctld changes it only at its next scheduling pass after they end
(accounting keeps it until the job starts), so it can outlive the jobs it names: `jobstate` checks them."""
NEVER_SATISFIED = "DependencyNeverSatisfied"
"""The reason of a job whose dependency can no longer be met (one it waited for with afterok did not complete): it
never starts, and waits until cancelled unless it was submitted with --kill-on-invalid-dep=yes."""

_JOB_ID = re.compile(r"(\d+)(?:_(\[[^\]]+\]|\d+))?(?:\+\d+)?")
_STEP = re.compile(r"\d+(?:_\d+)?(?:\+\d+)?\.\w+")
_SCONTROL_FIELD = re.compile(r"(\w+)=(\S*)")


def sacct_command(job_ids: Iterable[str]) -> list[str]:
    """Accounting for these jobs: one line per job or array task (`--allocations`: no steps), `|`-separated."""
    return ["sacct", "--jobs", ",".join(job_ids), "--allocations", "--noheader", "--parsable2",
            f"--format={SACCT_FIELDS}"]


def squeue_command(job_ids: Iterable[str]) -> list[str]:
    """The queue's view of these jobs, one line per array task (`--array`)."""
    return ["squeue", "--noheader", "--array", "--jobs", ",".join(job_ids), f"--format={SQUEUE_FORMAT}"]


def scontrol_command(job_id: str) -> list[str]:
    """slurmctld's memory of one job (and of all its array tasks), one line each; finished jobs stay MinJobAge."""
    return ["scontrol", "--oneliner", "show", "job", job_id]


def expand_tasks(spec: str) -> list[int]:
    """`0-3,7` or `[0-3%2]` -> [0, 1, 2, 3, 7]."""
    spec = spec.strip("[]").split("%")[0]
    tasks: list[int] = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        tasks.extend(range(int(low), int(high or low) + 1))
    return tasks


@dataclass(frozen=True)
class JobRecord:
    """One job, array task or range of pending array tasks, as one command reported it.

    A field is None where the command does not report it (squeue has no exit code and, in our format, no name).
    """

    job_id: str
    """As SLURM writes it: `12`, `12_3`, `12_[4-9%2]`, `12+1`."""
    job: str
    """The job id; the array job's id for array tasks (`12` in all four examples)."""
    tasks: tuple[int, ...] | None
    """The array tasks the record covers; None for a job that is no array task."""
    state: str
    """The state's first word: `CANCELLED` for sacct's `CANCELLED by 0`."""
    elapsed: str = ""
    node: str = ""
    """Where it runs or ran; "" while none is assigned."""
    exit_code: str | None = None
    """`exit status:signal`: `0:0`, `3:0` (exited 3), `0:15` (killed by SIGTERM)."""
    reason: str = ""
    """Why it waits or ended (`Dependency`, `JobArrayTaskLimit`, `BeginTime`, ...); "" for SLURM's `None`."""
    name: str | None = None

    @property
    def is_range(self) -> bool:
        """The pending rest of an array (`12_[4-9%2]`): accounting keeps it even after some of those tasks start."""
        return self.tasks is not None and "[" in self.job_id

    @property
    def exit_status(self) -> int | None:
        """The exit status (`3` of `3:0`); None when not reported."""
        return int(self.exit_code.split(":")[0]) if self.exit_code and ":" in self.exit_code else None

    @property
    def signal(self) -> int | None:
        """The signal that ended it (`15` of `0:15`), 0 for none; None when not reported."""
        return int(self.exit_code.split(":")[1]) if self.exit_code and ":" in self.exit_code else None


def split_job_id(job_id: str) -> tuple[str, tuple[int, ...] | None]:
    """`12_[4-9%2]` -> ("12", (4, ..., 9)); `12_3` -> ("12", (3,)); `12` and `12+1` -> ("12", None).
    An id of another shape comes back whole, with no tasks."""
    match = _JOB_ID.fullmatch(job_id)
    if not match:
        return job_id, None
    return match[1], tuple(expand_tasks(match[2])) if match[2] else None


def is_step(job_id: str) -> bool:
    """`12.batch`, `12_3.extern`, `12.0`: a step inside a job, not a job."""
    return _STEP.fullmatch(job_id) is not None


def _none(value: str, *nones: str) -> str:
    return "" if value in nones else value


def parse_sacct(text: str) -> list[JobRecord]:
    """Read `sacct_command`'s output; lines that are no record of a job (steps, other shapes) are skipped."""
    records = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 7 or is_step(parts[0]):
            continue
        job_id, name, state, elapsed, node, exit_code, reason = parts
        job, tasks = split_job_id(job_id)
        records.append(JobRecord(job_id, job, tasks, state=(state.split() or [""])[0], elapsed=elapsed,
                                 node=_none(node, "None assigned"), exit_code=exit_code, reason=_none(reason, "None"),
                                 name=name))
    return records


def parse_squeue(text: str) -> list[JobRecord]:
    """Read `squeue_command`'s output (finished jobs are not in it)."""
    records = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or is_step(parts[0]):
            continue
        job_id, state, elapsed, node, reason = parts
        job, tasks = split_job_id(job_id)
        records.append(JobRecord(job_id, job, tasks, state=state, elapsed=elapsed, node=node,
                                 reason=_none(reason, "None")))
    return records


def parse_scontrol(text: str) -> list[JobRecord]:
    """Read `scontrol_command`'s output: `Key=Value` words, one job or array task a line. A pending range comes as
    `ArrayTaskId=2-3%2` and is given the id `12_[2-3%2]`, as sacct and squeue write it."""
    records = []
    for line in text.splitlines():
        fields: dict[str, str] = dict(_SCONTROL_FIELD.findall(line))
        if "JobId" not in fields:
            continue
        task_id = fields.get("ArrayTaskId")
        if task_id:
            job = fields.get("ArrayJobId", fields["JobId"])
            job_id = f"{job}_{task_id}" if task_id.isdigit() else f"{job}_[{task_id}]"
            tasks: tuple[int, ...] | None = tuple(expand_tasks(task_id))
        else:
            job, job_id, tasks = fields["JobId"], fields["JobId"], None
        records.append(JobRecord(job_id, job, tasks, state=fields.get("JobState", "UNKNOWN"),
                                 elapsed=fields.get("RunTime", ""), node=_none(fields.get("NodeList", ""), "(null)"),
                                 exit_code=fields.get("ExitCode", ""), reason=_none(fields.get("Reason", ""), "None"),
                                 name=fields.get("JobName")))
    return records
