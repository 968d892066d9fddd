"""A stage's chunks as one job: what `snowpipe status | logs | cancel | runs` show and act on.

A stage of more array tasks than the cluster's MaxArraySize is submitted as consecutive array jobs (chunks), each
its own entry of the run record, named `{job}.{k}` with `chunk_of: "{job}"` (null for a job that fits in one). The
tools speak of the stage job: one status row with counts per state over every chunk's tasks, logs that count the
stage's tasks across its chunks, a cancel that reaches every chunk. Records written before `chunk_of` existed are
read by the name pattern `{job}.{k}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.contract.run_record import RecordedJob, RunRecord
from pipeline.monitor.slurm_parsers import expand_tasks

CHUNK_NAME = re.compile(r"(?P<job>.+)\.(?P<k>[1-9]\d*)")
"""`annotate.2`: chunk 2 of the stage job `annotate` (the plan names chunks `{job}.{k}`, k from 1)."""
FINE = {"COMPLETED", "PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUBMITTED"}
"""States a task of a healthy run passes through; any other state flags the task (listed on its own)."""
NEVER_STARTS = "never starts"
"""How `jobstate.explain_waits` begins the reason of a task whose dependency can no longer be met (flagged)."""


def chunk_of(job: RecordedJob) -> str | None:
    """The stage job this job is a chunk of; None for a job that is one whole stage. The record's `chunk_of` when
    it has the key (null included), else the name pattern `{job}.{k}`."""
    extra = job.model_extra or {}
    if "chunk_of" in extra or "chunk_of" in job.model_fields_set:
        given = getattr(job, "chunk_of", None)
        return str(given) if given else None
    match = CHUNK_NAME.fullmatch(job.name)
    return match["job"] if match else None


def stage_name(job: RecordedJob) -> str:
    """What the user calls the job: the stage job for a chunk, else its own name."""
    return chunk_of(job) or job.name


@dataclass
class StageJob:
    """One stage job of a run: its chunks (one job when it was not split), in the order they were submitted."""

    name: str
    jobs: list[RecordedJob] = field(default_factory=list)

    @property
    def chunked(self) -> bool:
        return any(chunk_of(job) for job in self.jobs)

    @property
    def ids(self) -> list[str]:
        return [job.id for job in self.jobs]

    def tasks(self) -> list[tuple[RecordedJob, int | None]]:
        """Every (chunk, array task index) of the stage job, in order: the stage's task i is the i-th."""
        return [(job, task) for job in self.jobs
                for task in (expand_tasks(job.array) if job.array else [None])]


def stage_jobs(record: RunRecord) -> list[StageJob]:
    """The run's stage jobs in record order. The chunks of one submission form one stage job; the same name
    submitted again later into the run (`-e run_id=RUN`) is another (its own submission time)."""
    groups: dict[tuple[str, str], StageJob] = {}
    for job in record.jobs:
        name = stage_name(job)
        groups.setdefault((name, job.submitted if chunk_of(job) else f"{job.submitted}#{job.id}"),
                          StageJob(name)).jobs.append(job)
    return list(groups.values())


def find(record: RunRecord, wanted: str) -> list[RecordedJob]:
    """The jobs `wanted` names: a stage job (all its chunks, of every submission), one chunk by its name, or a
    job id."""
    by_stage = [job for job in record.jobs if stage_name(job) == wanted]
    return by_stage or [job for job in record.jobs if wanted in (job.name, job.id)]


def is_flagged(state: str, reason: str) -> bool:
    """A task to list on its own: it ended otherwise than COMPLETED, no source knows it, or it never starts."""
    return state not in FINE or reason.startswith(NEVER_STARTS)


def ordered_counts(states: list[str]) -> dict[str, int]:
    """Tasks per state, in the order a run moves through them (flags last)."""
    order = ["COMPLETED", "RUNNING", "COMPLETING", "CONFIGURING", "PENDING", "SUBMITTED", "REQUEUED"]
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order),
                                                          item[0])))
