"""`snowpipe plan`: the jobs a submission would create, as a table or as the JSON Ansible reads."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.errors import ConfigError

DEFAULT_INVENTORY = Path(__file__).resolve().parent.parent.parent / "inventory" / "local.yml"
CLUSTER_GROUP = "cluster"


def inventory_host_vars(inventory: Path, host: str | None = None) -> tuple[str, dict[str, Any]]:
    """The first host of group `cluster` (or `host`) and its variables, as Ansible resolves them."""
    executable = shutil.which("ansible-inventory")
    if executable is None:
        raise ConfigError("ansible-inventory not found: install ansible-core (make setup does)")
    result = subprocess.run([executable, "-i", str(inventory), "--list"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"inventory {inventory} cannot be read: {result.stderr.strip().splitlines()[-1:]}")
    data = json.loads(result.stdout)
    hosts = data.get(CLUSTER_GROUP, {}).get("hosts", [])
    if host is None:
        if not hosts:
            raise ConfigError(f"inventory {inventory} has no host in group `{CLUSTER_GROUP}`")
        host = hosts[0]
    variables = data.get("_meta", {}).get("hostvars", {}).get(host)
    if variables is None:
        raise ConfigError(f"host {host} is not in inventory {inventory}")
    return host, variables


def _target_vars(raw: str) -> dict[str, Any]:
    path = Path(raw)
    text = path.read_text() if not raw.lstrip().startswith("{") and path.is_file() else raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--target-vars: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError("--target-vars: expected a JSON object of snowpipe_* variables")
    return data


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def print_plan(plan: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"run {plan['run_id']} on {plan['host']} ({plan['run_dir']})")
    for column in ("job", "stages", "array", "after", "resources"):
        table.add_column(column)
    for job in plan["jobs"]:
        options = job["sbatch"]
        resources = ", ".join(f"{key}={options[key]}" for key in ("time", "cpus-per-task", "mem", "gres", "gpus",
                                                                   "ntasks-per-node", "partition") if key in options)
        table.add_row(job["name"], ", ".join(job["stages"]), job["array"] or "-", ", ".join(job["after"]) or "-",
                      resources)
    console.print(table)
    for item in plan["sync"]:
        console.print(f"sync {item['source']} -> {plan['host']}:{item['dest']} "
                      f"({item['files']} files, {_human_size(item['bytes'])})")


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.cluster.plan import Target, make_plan  # imports the stages (torch): only when planning

    config_path = Path(args.config or "pipeline-config.yml")
    config = load_config(config_path)
    if args.target_vars:
        host, variables = args.host or "cluster", _target_vars(args.target_vars)
    else:
        host, variables = inventory_host_vars(Path(args.inventory), args.host)
    plan = make_plan(config, config_path.resolve(), args.job, Target.from_vars(host, variables), mode=args.mode,
                     run_id=args.run_id)
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print_plan(plan)
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show the SLURM jobs a submission would create (or their JSON plan)",
                       description="Compute a submission: jobs from jobs/NAME.yml with the inventory's resources, "
                                   "array sizes from the scenes found, files to sync. Submits nothing.")
    p.add_argument("config", nargs="?", help="config file (default: ./pipeline-config.yml)")
    p.add_argument("--job", default="pipeline", help="job spec in jobs/ (default: pipeline)")
    p.add_argument("-i", "--inventory", default=str(DEFAULT_INVENTORY),
                   help="Ansible inventory of the cluster (default: inventory/local.yml)")
    p.add_argument("--host", help="inventory host (default: the first of group `cluster`)")
    p.add_argument("--target-vars", metavar="JSON", help="the host's snowpipe_* variables as JSON (what the "
                                                         "playbook passes) instead of reading the inventory")
    p.add_argument("--mode", choices=("cluster", "dry_run", "local_run"), default="cluster",
                   help="where the run goes (default: cluster)")
    p.add_argument("--run-id", help="run id (default: date-time and a random suffix)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(func=cmd_plan)
