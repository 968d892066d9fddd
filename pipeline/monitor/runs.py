"""Run records: `runs/<run_id>.json` at the repository root, what `snowpipe status/logs/fetch/cancel` read.

The submit playbook pipes {"plan", "ids", "connection"} into `python -m pipeline.monitor.runs RUNS_DIR`;
the record keeps the fields docs/architecture.md lists (run_id, host, remote_dir, commit, config_hash, jobs with
name / id / after / array) plus what the SSH tools need to reconnect and find logs.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.data.writer import write_json
from pipeline.errors import SnowpipeError


def build_record(plan: dict[str, Any], ids: dict[str, str], connection: dict[str, Any]) -> dict[str, Any]:
    jobs = []
    for job in plan["jobs"]:
        jobs.append({
            "name": job["name"],
            "id": ids[job["name"]],
            "after": [ids[name] for name in job["after"]],
            "array": job["array"],
            "stages": job["stages"],
            "script": job["script"],
            "log": job["sbatch"]["output"],
        })
    return {
        "run_id": plan["run_id"],
        "host": connection["host"],
        "address": connection.get("address", connection["host"]),
        "port": int(connection.get("port", 22)),
        "user": connection.get("user", ""),
        "inventory": connection.get("inventory", ""),
        # Resolved by Ansible from the inventory at submission: what the SSH tools connect with.
        "key": connection.get("key", ""),
        "known_hosts": connection.get("known_hosts", ""),
        "remote_root": plan["remote_root"],
        "remote_dir": plan["run_dir"],
        "commit": plan["commit"],
        "dirty": plan["dirty"],
        "config_hash": plan["config_hash"],
        "config": plan["config_source"],
        "spec": plan["spec"],
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "jobs": jobs,
    }


def write_record(runs_dir: Path, record: dict[str, Any]) -> Path:
    """Write the record; a later submission into the same run (-e run_id=ID) adds its jobs to the list."""
    path = runs_dir / f"{record['run_id']}.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        record = {**record, "submitted": earlier.get("submitted", record["submitted"]),
                  "jobs": earlier.get("jobs", []) + record["jobs"]}
    write_json(path, record)
    return path


def main(argv: list[str]) -> int:
    data = json.load(sys.stdin)
    record = build_record(data["plan"], data["ids"], data["connection"])
    path = write_record(Path(argv[0]), record)
    jobs = ", ".join(f"{job['name']}={job['id']}" for job in record["jobs"])
    print(f"submitted run {record['run_id']} to {record['host']}: {jobs}; results in {record['remote_dir']}/results; "
          f"record {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


RUNS_DIR = Path(os.environ.get("SNOWPIPE_RUNS_DIR") or Path(__file__).resolve().parent.parent.parent / "runs")


def list_records(runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every recorded run, newest first."""
    records = []
    for path in (runs_dir or RUNS_DIR).glob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: (r.get("submitted", ""), r.get("run_id", "")), reverse=True)


def load_record(run_id: str | None, runs_dir: Path | None = None) -> dict[str, Any]:
    """One run's record; None = the newest. An unknown run names the known ones."""
    runs_dir = runs_dir or RUNS_DIR
    records = list_records(runs_dir)
    if not records:
        raise SnowpipeError(f"no run recorded in {runs_dir}: submit one with `cd ansible && ansible-playbook "
                            f"submit.yml`")
    if run_id is None:
        return records[0]
    for record in records:
        if record.get("run_id") == run_id:
            return record
    known = ", ".join(r["run_id"] for r in records[:5])
    raise SnowpipeError(f"no run {run_id!r} in {runs_dir} (newest: {known}); `snowpipe runs` lists them all")


def remember_state(record: dict[str, Any], summary: str, runs_dir: Path | None = None) -> None:
    """Cache the last summary state seen by `snowpipe status`, for `snowpipe runs` (no SSH there)."""
    path = (runs_dir or RUNS_DIR) / f"{record['run_id']}.json"
    if path.is_file():
        current = json.loads(path.read_text())
        current["last_state"] = {"summary": summary, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(path, current)
