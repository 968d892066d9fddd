"""Run records: `runs/<run_id>.json` at the repository root, what `snowpipe status/logs/fetch/cancel` read.

The submit playbook pipes {"plan", "ids", "connection"} into `python -m pipeline.monitor.runs RUNS_DIR`; the
record's fields are typed in pipeline/contract/run_record.py (run_id, host, remote_dir, commit, config_hash, jobs
with name / id / after / array, plus what the SSH tools need to reconnect and find logs).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipeline.contract import formats
from pipeline.contract.plan import Plan
from pipeline.contract.run_record import (
    Connection,
    LastState,
    RunRecord,
    UnreadableRecord,
    read_run_record,
    record_of_submission,
)
from pipeline.data.writer import write_text
from pipeline.errors import SnowpipeError

PRIVATE_FILE, PRIVATE_FOLDER = 0o600, 0o700  # records name the cluster, the user and the key's path: theirs alone
RUNS_DIR = Path(os.environ.get("SNOWPIPE_RUNS_DIR") or Path(__file__).resolve().parent.parent.parent / "runs")


class Submission(BaseModel):
    """What the record role pipes in: the plan, the job ids sbatch printed, and the connection used."""

    plan: Plan
    ids: dict[str, str]
    connection: Connection


def save_record(runs_dir: Path, record: RunRecord) -> Path:
    """Write the record; a later submission into the same run (-e run_id=ID) adds its jobs to the list."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.chmod(PRIVATE_FOLDER)
    path = runs_dir / f"{record.run_id}.json"
    if path.is_file():
        try:
            earlier = read_run_record(path)
        except UnreadableRecord as exc:
            raise SnowpipeError(f"{exc}: move it aside, then submit again") from None
        record = record.model_copy(update={"submitted": earlier.submitted or record.submitted,
                                           "jobs": earlier.jobs + record.jobs})
    write_text(path, record.to_json(), mode=PRIVATE_FILE)
    return path


def main(argv: list[str]) -> int:
    try:
        submission = Submission.model_validate_json(sys.stdin.read())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        print(f"run record: the submission handed over does not match the plan format ({exc.error_count()} "
              f"problem(s), first: {where}: {first['msg']}); plan and record with the same snowpipe checkout",
              file=sys.stderr)
        return 2
    record = record_of_submission(submission.plan, submission.ids, submission.connection)
    path = save_record(Path(argv[0]), record)
    jobs = ", ".join(f"{job.name}={job.id}" for job in record.jobs)
    print(f"submitted run {record.run_id} to {record.host}: {jobs}; results in {record.remote_dir}/results; "
          f"record {path}")
    return 0


def list_records(runs_dir: Path | None = None) -> list[RunRecord]:
    """Every readable recorded run, newest first (a file that is not a record is skipped)."""
    records = []
    for path in (runs_dir or RUNS_DIR).glob("*.json"):
        try:
            records.append(read_run_record(path))
        except (OSError, UnreadableRecord):
            continue
    return sorted(records, key=lambda r: (r.submitted, r.run_id), reverse=True)


def load_record(run_id: str | None, runs_dir: Path | None = None) -> RunRecord:
    """One run's record; None = the newest. An unknown run names the known ones."""
    runs_dir = runs_dir or RUNS_DIR
    problem = formats.run_id_problem(run_id) if run_id is not None else None
    if problem:
        raise SnowpipeError(problem)
    if run_id is not None and (runs_dir / f"{run_id}.json").is_file():
        try:
            return read_run_record(runs_dir / f"{run_id}.json")
        except UnreadableRecord as exc:
            raise SnowpipeError(str(exc)) from None
    records = list_records(runs_dir)
    if not records:
        raise SnowpipeError(f"no run recorded in {runs_dir}: submit one with `cd ansible && ansible-playbook "
                            f"submit.yml`")
    if run_id is None:
        return records[0]
    for record in records:
        if record.run_id == run_id:
            return record
    known = ", ".join(r.run_id for r in records[:5])
    raise SnowpipeError(f"no run {run_id!r} in {runs_dir} (newest: {known}); `snowpipe runs` lists them all")


def remember_state(record: RunRecord, summary: str, runs_dir: Path | None = None) -> None:
    """Cache the last summary state seen by `snowpipe status`, for `snowpipe runs` (no SSH there)."""
    path = (runs_dir or RUNS_DIR) / f"{record.run_id}.json"
    try:
        current = read_run_record(path)
    except (OSError, UnreadableRecord):
        return
    state = LastState(summary=summary, at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_text(path, current.model_copy(update={"last_state": state}).to_json(), mode=PRIVATE_FILE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
