"""What `sacct` says a run's jobs used, read into plain records: the one module that knows those columns.

`usage_command` builds the argv `snowpipe report` runs once over SSH; `parse_usage` reads exactly its stdout. The
allocation line of a job or array task carries elapsed time, allocated CPUs and GPUs (AllocTRES), CPU time used
(TotalCPU, summed over its steps by sacct) and memory asked (ReqMem); the peak memory (MaxRSS) lives on the steps
(`.batch`, `.extern`, `.0`), so the steps are read too and their largest MaxRSS goes to their allocation. With
`--duplicates` every start of a requeued job is its own allocation line, followed by its own steps: each start is
counted, as each one was paid for.

Formats read (tests/test_usage_parsers.py): SLURM 22.05 as recorded from the embedded cluster, and the later
versions' documented forms (typed GPUs in AllocTRES, `Partition_Limit`, ReqMem with the pre-21.08 `n`/`c`
suffixes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime

from pipeline.monitor.slurm_parsers import is_step, split_job_id

USAGE_FIELDS = ("JobID,JobName,State,ElapsedRaw,Eligible,Start,TimelimitRaw,AllocCPUS,TotalCPU,CPUTimeRAW,MaxRSS,"
                "ReqMem,AllocTRES")
"""`sacct --format`; `parse_usage` reads these thirteen columns in this order."""
_COLUMNS = len(USAGE_FIELDS.split(","))
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)([nc]?)$")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
UNLIMITED_MINUTES = 525600
"""A year: sacct writes an array task's unlimited time limit as 525600 minutes (22.05); taken as no limit."""


def usage_command(job_ids: Iterable[str]) -> list[str]:
    """Accounting of these jobs with their steps (MaxRSS is a step's), every start of a requeued job included."""
    return ["sacct", "--jobs", ",".join(job_ids), "--duplicates", "--noheader", "--parsable2",
            f"--format={USAGE_FIELDS}"]


@dataclass(frozen=True)
class Usage:
    """One start of one job or array task, as accounting saw it."""

    job_id: str
    """`12` or `12_3`."""
    job: str
    task: int | None
    name: str
    state: str
    elapsed_s: int
    wait_s: int | None
    """From eligible (its dependencies met) to start; None while it has not started."""
    time_limit_s: int | None
    """None: no limit (UNLIMITED, Partition_Limit, or a year)."""
    cpus: int
    cpu_used_s: float
    """TotalCPU: user + system time of all its steps."""
    cpu_alloc_s: int
    """CPUTimeRAW: allocated CPUs x elapsed."""
    gpus: int
    max_rss_bytes: int | None
    """The largest MaxRSS of its steps; None where no step reported one."""
    requested_mem_bytes: int | None


def size_bytes(text: str, cpus: int = 1) -> int | None:
    """`168344K`, `1.50G`, `200M`, `4000Mc` (per CPU, before 21.08: times `cpus`), `0` -> bytes; "" -> None."""
    match = _SIZE.match(text.strip())
    if not match:
        return None
    number, unit, per = match.groups()
    return int(float(number) * _UNITS[unit] * (cpus if per == "c" else 1))


def cpu_seconds(text: str) -> float:
    """TotalCPU: `[D-][HH:]MM:SS[.mmm]` -> seconds; "" -> 0."""
    text = text.strip()
    if not text:
        return 0.0
    days, _, clock = text.rpartition("-")
    parts = [float(part) for part in clock.split(":")]
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds + (int(days) * 86400 if days else 0)


def gpu_count(tres: str) -> int:
    """GPUs in AllocTRES: `gres/gpu=2`; where only typed counts are listed (`gres/gpu:a100=2`), their sum."""
    total, typed = None, 0
    for item in filter(None, tres.split(",")):
        key, _, value = item.partition("=")
        if not value.isdigit():
            continue
        if key == "gres/gpu":
            total = int(value)
        elif key.startswith("gres/gpu:"):
            typed += int(value)
    return total if total is not None else typed


def _time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # Unknown, None
        return None


def _limit(text: str) -> int | None:
    return int(text) * 60 if text.isdigit() and int(text) < UNLIMITED_MINUTES else None


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def parse_usage(text: str) -> list[Usage]:
    """Read `usage_command`'s output: one record per start of a job or array task (pending ranges skipped)."""
    records: list[Usage] = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != _COLUMNS:
            continue
        (job_id, name, state, elapsed, eligible, start, limit, cpus, total_cpu, cpu_time, max_rss, req_mem,
         tres) = parts
        if is_step(job_id):
            rss = size_bytes(max_rss)
            owner = job_id.split(".")[0]
            if records and records[-1].job_id == owner and rss is not None:
                previous = records[-1].max_rss_bytes
                records[-1] = replace(records[-1], max_rss_bytes=rss if previous is None else max(previous, rss))
            continue
        job, tasks = split_job_id(job_id)
        if "[" in job_id or (tasks is not None and len(tasks) != 1):
            continue  # the pending rest of an array: nothing used yet
        began, ready = _time(start), _time(eligible)
        if began and ready and began < ready:  # a requeued job cancelled before it started again shows the old start
            began = None
        records.append(Usage(
            job_id=job_id, job=job, task=tasks[0] if tasks else None, name=name, state=(state.split() or [""])[0],
            elapsed_s=_int(elapsed), wait_s=int((began - ready).total_seconds()) if began and ready else None,
            time_limit_s=_limit(limit), cpus=_int(cpus), cpu_used_s=cpu_seconds(total_cpu),
            cpu_alloc_s=_int(cpu_time), gpus=gpu_count(tres), max_rss_bytes=size_bytes(max_rss),
            requested_mem_bytes=size_bytes(req_mem, _int(cpus) or 1)))
    return records
