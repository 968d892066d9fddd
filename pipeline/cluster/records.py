"""Run records: `runs/<run_id>.json` at the repository root, what `snowpipe status/logs/fetch/cancel` read.

The submit playbook pipes {"plan", "ids", "connection"} into `python -m pipeline.cluster.records RUNS_DIR`;
the record keeps the fields DESIGN.md fixes (run_id, host, remote_dir, commit, config_hash, jobs with
name / id / after / array) plus what the SSH tools need to reconnect and find logs.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.data.writer import write_json


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
