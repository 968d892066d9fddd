"""`snowpipe plan`: the jobs a submission would create, as a table or as the JSON Ansible reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.contract.plan import Plan
from pipeline.errors import ConfigError

DEFAULT_INVENTORY = Path(__file__).resolve().parent.parent.parent / "inventory" / "local.yml"
CLUSTER_GROUP = "cluster"


def inventory_host_vars(inventory: Path, host: str | None = None) -> tuple[str, dict[str, Any]]:
    """The first host of group `cluster` (or `host`) and its snowpipe_* variables, templated as Ansible
    templates them for a play (group_vars included; `{{ inventory_dir }}` and lookups resolved)."""
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    if not inventory.is_file():
        raise ConfigError(f"inventory {inventory} not found: pass -i inventory/local.yml or your cluster's file")
    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(inventory)])
    hosts = manager.get_groups_dict().get(CLUSTER_GROUP, [])
    host = host or (hosts[0] if hosts else None)
    if host is None or manager.get_host(host) is None:
        raise ConfigError(f"inventory {inventory} has no host {host or f'in group `{CLUSTER_GROUP}`'}")
    variables = VariableManager(loader=loader, inventory=manager).get_vars(host=manager.get_host(host))
    templar = Templar(loader=loader, variables=variables)
    try:
        return host, {key: templar.template(value) for key, value in variables.items() if key.startswith("snowpipe_")}
    except AnsibleError as exc:
        raise ConfigError(f"inventory {inventory}, host {host}: {exc.message}") from None


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


def print_plan(plan: Plan) -> None:
    console = Console()
    table = Table(title=f"run {plan.run_id} on {plan.host} ({plan.run_dir})")
    for column in ("job", "stages", "array", "after", "resources"):
        table.add_column(column)
    for job in plan.jobs:
        options = job.sbatch
        resources = ", ".join(f"{key}={options[key]}" for key in ("time", "cpus-per-task", "mem", "gres", "gpus",
                                                                   "ntasks-per-node", "partition") if key in options)
        table.add_row(job.name, ", ".join(job.stages), job.array or "-", ", ".join(job.after) or "-", resources)
    console.print(table)
    for item in plan.sync:
        console.print(f"sync {item.source} -> {plan.host}:{item.dest} ({item.files} files, {_human_size(item.bytes)})")
    if plan.decoded_dir:
        console.print(f"decode: up to {_human_size(plan.decoded_bytes)} of decoded rasters in {plan.host}:"
                      f"{plan.decoded_dir} (uint16 at native resolution, before ZSTD saves about a third; "
                      f"shared by runs, kept unless decode.keep: until_used)")


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.submit.plan import Target, make_plan  # imports the stages (torch): only when planning

    config_path = Path(args.config or "pipeline-config.yml")
    config = load_config(config_path)
    if args.target_vars:
        host, variables = args.host or "cluster", _target_vars(args.target_vars)
    else:
        host, variables = inventory_host_vars(Path(args.inventory), args.host)
    plan = make_plan(config, config_path.resolve(), args.job, Target.from_vars(host, variables), mode=args.mode,
                     run_id=args.run_id)
    if args.json:
        print(plan.to_json())
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
