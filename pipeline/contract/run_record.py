"""The run record (`runs/<run_id>.json`) as types: written at submission, read by `snowpipe runs/status/logs/
fetch/cancel`.

Records written before the record had a version (schema 0) still load: every field added since has a default.
Unknown keys are kept (`extra="allow"`), so an older snowpipe reading a newer record, or a user's note in the
file, loses nothing when the record is rewritten.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.contract import formats
from pipeline.contract.plan import Plan


class RecordedJob(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    id: str
    after: list[str] = []          # job ids it waited for
    after_each: list[str] = []     # those of `after` whose array task i its task i waited for (aftercorr)
    array: str | None = None
    stages: list[str] = []
    script: str = ""
    log: str = ""                  # the --output pattern (%x, %j, %A, %a)
    submitted: str = ""            # when sbatch accepted it (UTC, ISO 8601); "" in records older than it
    chunk_of: str | None = None    # `{job}.{k}` is one array job of stage job `{job}`; None: a whole job
    estimated_minutes: float | None = None  # the plan's minutes per task (the cost model); None in older records

    def log_of(self, task: int | None) -> str:
        """The output file of one of its tasks (the array job id stands for %A and %j alike)."""
        return formats.expand_log(self.log, self.name, self.id, self.id, task) if self.log else ""


class LastState(BaseModel):
    summary: str
    at: str


class Connection(BaseModel):
    """How Ansible reached the cluster, resolved from the inventory at submission."""

    host: str
    address: str = ""
    port: int = 22
    user: str = ""
    inventory: str = ""
    key: str = ""
    known_hosts: str = ""


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: int = Field(0, alias=formats.SCHEMA_KEY)
    run_id: str
    host: str
    address: str = ""
    port: int = 22
    user: str = ""
    inventory: str = ""
    key: str = ""                  # "" = ssh's default keys
    known_hosts: str = ""          # "" = ~/.ssh/known_hosts
    remote_root: str = ""
    remote_dir: str
    commit: str = "unknown"
    dirty: bool = False
    config_hash: str = ""
    submission_key: str = ""       # see Plan.submission_key ("" in records older than it)
    config: str = ""               # the config file it was planned from, on the laptop
    spec: str = ""
    submitted: str = ""
    jobs: list[RecordedJob] = []
    last_state: LastState | None = None

    @property
    def login_address(self) -> str:
        return self.address or self.host

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1) + "\n"


class UnreadableRecord(ValueError):
    """A record file that is not JSON or lacks what identifies a run."""


def read_run_record(path: Path) -> RunRecord:
    try:
        record = RunRecord.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise UnreadableRecord(f"{path}: not a run record ({str(exc).splitlines()[0]})") from None
    if record.schema_version > formats.RUN_RECORD_SCHEMA:
        raise UnreadableRecord(f"{path}: written by a newer snowpipe (record format {record.schema_version}, this "
                               f"one reads up to {formats.RUN_RECORD_SCHEMA}); update snowpipe")
    return record


def record_of_submission(plan: Plan, ids: dict[str, str], connection: Connection) -> RunRecord:
    """The record of jobs just submitted: the plan's jobs with the ids sbatch gave them."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    jobs = [RecordedJob(name=job.name, id=ids[job.name], after=[ids[name] for name in job.after],
                        after_each=[ids[name] for name in job.after_each], array=job.array, stages=job.stages,
                        script=job.script, log=job.log, submitted=now, chunk_of=job.chunk_of,
                        estimated_minutes=job.estimate.minutes_per_task) for job in plan.jobs]
    return RunRecord(
        schema_version=formats.RUN_RECORD_SCHEMA, run_id=plan.run_id, host=connection.host,
        address=connection.address or connection.host, port=connection.port, user=connection.user,
        inventory=connection.inventory, key=connection.key, known_hosts=connection.known_hosts,
        remote_root=plan.remote_root, remote_dir=plan.run_dir, commit=plan.commit, dirty=plan.dirty,
        config_hash=plan.config_hash, submission_key=plan.submission_key, config=plan.config_source, spec=plan.spec,
        submitted=now, jobs=jobs)
