"""`snowpipe plan`: the jobs a submission would create, as a table or as the JSON Ansible reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.cluster_facts import load_facts
from pipeline.config import load_config
from pipeline.contract.plan import Plan
from pipeline.errors import ConfigError
from pipeline.inventory import DEFAULT_INVENTORY, inventory_host_vars
from pipeline.submit.cluster_check import plan_problems, refusal


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


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of GPU-hours, 0 or more, got {text!r}")
    return value


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _hours(value: float) -> str:
    return "-" if value == 0 else f"{value:.2f}" if value >= 0.01 else "<0.01"


def print_plan(plan: Plan) -> None:
    console = Console()
    table = Table(title=f"run {plan.run_id} on {plan.host} ({plan.run_dir})")
    for column in ("job", "stages", "array", "after", "resources"):
        table.add_column(column)
    costs = Table(title="estimated cost (cost model: pipeline/submit/cost.py, docs/benchmarks.md)")
    for column in ("job", "tasks", "scenes/task", "min/task", "limit", "CPU-hours", "GPU-hours"):
        costs.add_column(column, justify="left" if column == "job" else "right", no_wrap=True)
    for job in plan.jobs:
        options = job.sbatch
        resources = ", ".join(f"{key}={options[key]}" for key in ("time", "cpus-per-task", "mem", "gres", "gpus",
                                                                   "ntasks-per-node", "partition") if key in options)
        table.add_row(job.name, ", ".join(job.stages), job.array or "-", ", ".join(job.after) or "-", resources)
        cost = job.estimate
        limit = cost.time_limit_minutes
        over = limit is not None and cost.minutes_per_task > limit
        costs.add_row(job.name, str(cost.tasks), str(cost.scenes_per_task or "-"),
                      f"{'[red]' if over else ''}{cost.minutes_per_task:.1f}{'[/red]' if over else ''}",
                      "-" if limit is None else f"{limit:.0f}", _hours(cost.cpu_hours), _hours(cost.gpu_hours))
    console.print(table)
    console.print(costs)
    console.print(f"estimate: {plan.estimate.cpu_hours:.2f} CPU-hours, {plan.estimate.gpu_hours:.2f} GPU-hours "
                  f"allocated (CPUs or GPUs x estimated minutes x tasks; the cost model of docs/benchmarks.md, "
                  f"measured on other machines: an order of magnitude)")
    learned = {(job.chunk_of or job.name): job.estimate.source for job in plan.jobs
               if job.estimate.source != "cost model"}
    for name, source in learned.items():  # a finished run on this cluster measured the stage
        console.print(f"  {name}: minutes from {source}", markup=False, soft_wrap=True)
    chunked = sorted({job.chunk_of for job in plan.jobs if job.chunk_of})
    if chunked:
        console.print(f"split in array jobs of at most {plan.max_array_size} tasks (MaxArraySize): "
                      f"{', '.join(chunked)}")
    for item in plan.sync:
        console.print(f"sync {item.source} -> {plan.host}:{item.dest} ({item.files} files, {_human_size(item.bytes)})")
    if plan.decoded_dir:
        console.print(f"decode: up to {_human_size(plan.decoded_bytes)} of decoded rasters in {plan.host}:"
                      f"{plan.decoded_dir} (uint16 at native resolution, before ZSTD saves about a third; "
                      f"shared by runs, kept unless decode.keep: until_used)")
    for warning in plan.estimate.warnings:
        console.print(f"[yellow]note: {warning}[/yellow]", highlight=False)


def check_gpu_budget(plan: Plan, max_gpu_hours: float | None) -> None:
    """Refuse a run whose estimated GPU-hours pass the budget given (-e max_gpu_hours=N), before anything moves."""
    if max_gpu_hours is not None and plan.estimate.gpu_hours > max_gpu_hours:
        by_job: dict[str, float] = {}
        for job in plan.jobs:  # a stage's chunks as one job
            by_job[job.chunk_of or job.name] = by_job.get(job.chunk_of or job.name, 0.0) + job.estimate.gpu_hours
        heavy = max(by_job, key=lambda name: by_job[name])
        raise ConfigError(f"run {plan.run_id} is estimated at {plan.estimate.gpu_hours:.2f} GPU-hours, above "
                          f"max_gpu_hours {max_gpu_hours:g} (most in job {heavy}: {by_job[heavy]:.2f}); nothing "
                          f"was sent. Submit fewer scenes (config `dates`) "
                          f"or epochs, or raise max_gpu_hours; `snowpipe plan` shows the estimate per job")


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.submit.plan import REPO_ROOT, Target, make_plan  # imports the stages (torch): only when planning

    config_path = Path(args.config or "pipeline-config.yml")
    config = load_config(config_path)
    if args.target_vars:
        host, variables = args.host or "cluster", _target_vars(args.target_vars)
    else:
        host, variables = inventory_host_vars(Path(args.inventory), args.host)
    plan = make_plan(config, config_path.resolve(), args.job, Target.from_vars(host, variables), mode=args.mode,
                     run_id=args.run_id)
    if args.mode != "local_run":  # the probed facts of this host (snowpipe probe): refuse before any data moves
        problems = plan_problems(plan.jobs, load_facts(REPO_ROOT, host))
        if problems:
            raise ConfigError(refusal(problems, host))
    check_gpu_budget(plan, args.max_gpu_hours)
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan)
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show the SLURM jobs a submission would create (or their JSON plan)",
                       description="Compute a submission: jobs from jobs/NAME.yml with the inventory's resources, "
                                   "array sizes from the scenes found (split in chunks past the cluster's "
                                   "MaxArraySize), files to sync, and what each job will cost (minutes per task, "
                                   "CPU- and GPU-hours, from the cost model in docs/benchmarks.md). Submits "
                                   "nothing.")
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
    p.add_argument("--max-gpu-hours", type=_non_negative, metavar="N",
                   help="refuse (exit 2) a run whose estimated GPU-hours pass N (ansible: -e max_gpu_hours=N)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(func=cmd_plan)
