"""What `snowpipe probe` learnt about a cluster, kept per inventory host for the planner.

One JSON file per host in `.snowpipe/cluster-facts/<host>.json` at the project root (git-ignored: it describes
the user's cluster, not the project). The planner reads it where the inventory is silent: an inventory variable
wins over a probed fact, a probed fact over the default (`fact_or_default`). The playbook's preflight probes when
no file exists for the host; `snowpipe probe` refreshes it.

Keys (all optional but `host` and `probed_at`; `partial` lists what could not be read, e.g. sacctmgr refused):
`slurm_version`, `max_array_size`, `max_job_count`, `min_job_age_s`, `accounting`, `partitions` (name, default,
available, time_limit_s (None: infinite), nodes, cpus_per_node, memory_mb_per_node, gpus {type: per node}),
`max_submit_jobs` (the lowest submit limit found for the user), `qos`, `partial`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.data.writer import write_json

FACTS_FOLDER = Path(".snowpipe") / "cluster-facts"
FACTS_SCHEMA = 1
DEFAULT_MAX_ARRAY_SIZE = 1001
"""SLURM's default MaxArraySize: the largest array index is 1000."""


def facts_path(project_root: Path, host: str) -> Path:
    """Where the facts of inventory host `host` live (its name made safe as a file name)."""
    return project_root / FACTS_FOLDER / f"{re.sub(r'[^A-Za-z0-9._-]', '_', host)}.json"


def save_facts(project_root: Path, host: str, facts: dict[str, Any]) -> Path:
    """Write the facts atomically (replacing earlier ones) and return the file."""
    target = facts_path(project_root, host)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, {"schema": FACTS_SCHEMA, **facts, "host": host})
    return target


def load_facts(project_root: Path, host: str) -> dict[str, Any] | None:
    """The facts probed for `host`, or None when none were (or the file is unreadable or of a newer schema: the
    plan then goes on with the inventory and the defaults, as before any probe)."""
    try:
        facts = json.loads(facts_path(project_root, host).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or facts.get("schema", 0) > FACTS_SCHEMA:
        return None
    return facts


def fact_or_default(inventory_value: Any, facts: dict[str, Any] | None, key: str, default: Any) -> Any:
    """The inventory's value when set, else the probed fact when known, else the default."""
    if inventory_value not in (None, ""):
        return inventory_value
    if facts and facts.get(key) is not None:
        return facts[key]
    return default


def slurm_seconds(text: str) -> int | None:
    """A SLURM time as sbatch and sinfo write it -> seconds: `30` (minutes), `MM:SS`, `HH:MM:SS`, `D-HH`,
    `D-HH:MM`, `D-HH:MM:SS`; `infinite` / `UNLIMITED` / "" -> None (no limit)."""
    text = text.strip()
    if not text or text.lower() in {"infinite", "unlimited", "n/a", "partition_limit"}:
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        whole_days = int(days) if days else 0
    except ValueError:
        return None
    if days:
        parts = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        parts = [0, parts[0], 0]
    elif len(parts) == 2:
        parts = [0, *parts]
    hours, minutes, seconds = parts[:3]
    return whole_days * 86400 + hours * 3600 + minutes * 60 + seconds


def slurm_megabytes(text: str) -> int | None:
    """A memory size as sbatch reads it (`16G`, `4000M`, `1024` = MB, `1T`) -> MB; None when unreadable."""
    text = text.strip().upper()
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "M")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        return None

