"""Refusing submissions that would do the same work twice (`snowpipe check-submission`, run by the preflight role).

Two cases, both asked of the cluster over SSH with the run records' connections:
- a new run whose submission key (code, job spec, config, data: `Plan.submission_key`) equals a recorded run that
  still has a task pending or running: refused, naming that run; `-e force=true` submits anyway;
- jobs added to an existing run (`-e run_id=RUN`) while a job of the same name in that run is still queued or
  running: refused, always (a second copy would write the same outputs; finished work is never redone anyway,
  the stages' completion records see to that);
- a new run whose submission key equals a recorded run that finished with every task COMPLETED: nothing to do.
  The command exits with NOTHING_TO_DO and the playbook ends before any data is sent or any job submitted (a
  resubmission of a finished run: 0 jobs, 0 files); `-e force=true` submits anyway.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import jobstate
from pipeline.monitor.runs import list_records
from pipeline.progress import say

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}
NOTHING_TO_DO = 3  # exit code of check-submission: the same submission already finished (the playbook ends there)


def unfinished(record: RunRecord, names: Iterable[str] | None = None) -> list[jobstate.TaskState]:
    """The run's tasks (of the jobs named, or all) that SLURM still holds pending or running."""
    from pipeline.monitor.ssh import ClusterConnection  # paramiko: only when a record is in question

    wanted = set(names) if names is not None else None
    record = record.model_copy(update={"jobs": [job for job in record.jobs if wanted is None or job.name in wanted]})
    if not record.jobs:
        return []
    with ClusterConnection(record) as remote:
        rows, _ = jobstate.query(remote, record)
    return [row for row in rows if not row.done]


def check_submission(key: str, run_id: str | None, jobs: list[str], force: bool) -> str | None:
    """Raise SnowpipeError when this submission would duplicate queued work; the id of a recorded run that is this
    same submission and finished with every task COMPLETED, else None (see the module docstring)."""
    records = list_records()
    existing = next((record for record in records if record.run_id == run_id), None) if run_id else None
    if existing is not None:  # jobs added to a recorded run (-e run_id=RUN)
        if existing.submission_key == key and not force and finished(existing):
            return existing.run_id  # this very submission, sent again into the run it made, which finished
        busy = unfinished(existing, jobs)
        if busy:
            row = busy[0]
            raise SnowpipeError(
                f"run {run_id}: job {row.name} (id {row.id}) is still {row.state}; adding it again would run "
                f"it twice. Wait for it (snowpipe status {run_id} --watch) or cancel it (snowpipe cancel "
                f"{run_id} {row.name}), then submit again")
        return None
    if force:
        return None
    for record in records:
        if record.submission_key != key:
            continue
        if record.last_state and record.last_state.summary in FINAL:
            if record.last_state.summary == "COMPLETED":
                return record.run_id
            continue
        rows = everything(record)
        busy = [row for row in rows if not row.done]
        if rows and not busy and jobstate.summary(rows) == "COMPLETED":
            return record.run_id
        if busy:
            raise SnowpipeError(
                f"run {record.run_id} is this same submission (commit, job spec, config and data) and is still "
                f"{jobstate.summary(busy)}: follow it with `snowpipe status {record.run_id}`, or submit a new run "
                f"anyway with -e force=true")
    return None


def finished(record: RunRecord) -> bool:
    """Whether every task of the run ended COMPLETED (the last state seen, else asked of the cluster)."""
    if record.last_state and record.last_state.summary in FINAL:
        return record.last_state.summary == "COMPLETED"
    rows = everything(record)
    return bool(rows) and all(row.done for row in rows) and jobstate.summary(rows) == "COMPLETED"


def everything(record: RunRecord) -> list[jobstate.TaskState]:
    """Every task of the run with its state, asked of the cluster."""
    from pipeline.monitor.ssh import ClusterConnection  # paramiko: only when a record is in question

    if not record.jobs:
        return []
    with ClusterConnection(record) as remote:
        rows, _ = jobstate.query(remote, record)
    return rows


def cmd_check_submission(args: argparse.Namespace) -> int:
    done = check_submission(args.key, args.run_id, [name for name in args.jobs.split(",") if name], args.force)
    if done:
        print(f"run {done} is this same submission (commit, job spec, config and data) and finished with every "
              f"task COMPLETED: nothing to submit and nothing sent. Its results: snowpipe fetch {done}; to run it "
              f"again anyway: -e force=true")
        return NOTHING_TO_DO
    say("no duplicate of queued work")
    return 0


def add_check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-submission", help="refuse a submission that duplicates queued work (the playbook "
                                                "runs it)",
                       description="Exit 1, naming the run, when a recorded run with the same submission key still "
                                   "has tasks queued or running, or when jobs added to RUN are still queued there; "
                                   f"exit {NOTHING_TO_DO} when a recorded run with the same key finished with every "
                                   "task COMPLETED (nothing to do).")
    p.add_argument("key", help="the plan's submission_key")
    p.add_argument("--run-id", help="the run the jobs are added to (-e run_id=RUN)")
    p.add_argument("--jobs", default="", help="comma-separated job names of this submission")
    p.add_argument("--force", action="store_true", help="allow a duplicate of a queued run (-e force=true)")
    p.set_defaults(func=cmd_check_submission)
