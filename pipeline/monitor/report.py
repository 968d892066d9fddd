"""`snowpipe report`: what a run cost per stage (CPU-hours, GPU-hours, memory, waits) and what to ask for next.

One `sacct` call over SSH reads every job and array task of the run with their steps (`usage_parsers`); one more
command reads the small JSONs train and infer write (`{results}/busy/*.json`, pipeline/model/busy.py), the time
the model kept its device busy. Per job of the run (named as in the job spec: decode, annotate, ...) the report
adds them up, prints a table with advice that names the job spec key to change, and writes the same as JSON and a
PNG into `runs/<RUN>/results/` (where `snowpipe fetch` puts the run's results). Without accounting it shows the
stages' own timings and says what it cannot know.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import runs
from pipeline.monitor.stagejobs import stage_name
from pipeline.monitor.usage_parsers import Usage, parse_usage, usage_command
from pipeline.progress import say

if TYPE_CHECKING:
    from pipeline.monitor.ssh import ClusterConnection

GIB = 1024**3
MEMORY_SLACK = 2.0
"""Advice when a stage asked more than twice the memory its largest task used (and at least 512 MiB more)."""
CPU_EFFICIENCY_LOW = 1 / 3
GPU_BUSY_LOW = 0.5
TIME_LIMIT_CLOSE = 0.8
"""Advice when a task used more than 80 % of its time limit."""
REPORT_NAME = "report"
"""runs/<RUN>/results/report.json and report.png."""


@dataclass
class StageCost:
    """One job of the run (a stage, or the stages one job spec runs together), its tasks added up."""

    name: str
    stages: list[str]
    usages: list[Usage] = field(default_factory=list)
    busy: list[dict[str, Any]] = field(default_factory=list)
    estimates: list[float] = field(default_factory=list)  # the plan's minutes per task, per job (chunk) of it

    def measured_minutes(self) -> float | None:
        """Mean minutes of a task when every task's last start COMPLETED (what the plan learns from), else None."""
        last = list(self.last_starts.values())
        if not last or any(u.state != "COMPLETED" for u in last):
            return None
        return round(statistics.mean(u.elapsed_s for u in last) / 60, 4)

    @property
    def last_starts(self) -> dict[str, Usage]:
        """The last start of each task: its state now (every start still counts for the hours)."""
        return {usage.job_id: usage for usage in self.usages}

    def as_dict(self) -> dict[str, Any]:
        usages, last = self.usages, list(self.last_starts.values())
        elapsed = [u.elapsed_s for u in usages]
        waits = [u.wait_s for u in last if u.wait_s is not None]
        alloc = sum(u.cpu_alloc_s for u in usages)
        rss = [u.max_rss_bytes for u in usages if u.max_rss_bytes is not None]
        asked = [u.requested_mem_bytes for u in usages if u.requested_mem_bytes is not None]
        fractions = [u.elapsed_s / u.time_limit_s for u in last if u.time_limit_s]
        states: dict[str, int] = {}
        for u in last:
            states[u.state] = states.get(u.state, 0) + 1
        busy_s = sum(float(b.get("busy_s") or 0) for b in self.busy)
        wall_s = sum(float(b.get("wall_s") or 0) for b in self.busy)
        return {
            "name": self.name, "stages": self.stages, "tasks": len(last),
            "starts": len(usages), "states": states,
            "elapsed_s": {"sum": sum(elapsed), "median": statistics.median(elapsed) if elapsed else None,
                          "max": max(elapsed, default=None)},
            "queue_wait_s": {"median": statistics.median(waits) if waits else None, "max": max(waits, default=None)},
            "cpus": max((u.cpus for u in usages), default=None),
            "cpu_hours": round(alloc / 3600, 6),
            "cpu_used_hours": round(sum(u.cpu_used_s for u in usages) / 3600, 6),
            "cpu_efficiency": round(sum(u.cpu_used_s for u in usages) / alloc, 4) if alloc else None,
            "gpus": max((u.gpus for u in usages), default=None),
            "gpu_hours": round(sum(u.gpus * u.elapsed_s for u in usages) / 3600, 6),
            "max_rss_bytes": max(rss, default=None),
            "requested_mem_bytes": max(asked, default=None),
            "gpu_busy": round(busy_s / wall_s, 4) if wall_s > 0 else None,
            "gpu_busy_method": self.busy[0].get("method") if self.busy else None,
            "gpu_utilization_nvidia_smi": _smi_mean(self.busy),
            "time_limit_s": max((u.time_limit_s for u in last if u.time_limit_s), default=None),
            "time_used_fraction": round(max(fractions), 4) if fractions else None,
            "estimated_minutes_per_task": round(statistics.mean(self.estimates), 4) if self.estimates else None,
            "measured_minutes_per_task": self.measured_minutes(),
        }


def _smi_mean(busy: list[dict[str, Any]]) -> float | None:
    """nvidia-smi's mean utilization over the stage's tasks, weighted by their samples (None: never sampled)."""
    pairs = [(float(b["nvidia_smi_utilization"]), int(b.get("nvidia_smi_samples") or 0)) for b in busy
             if isinstance(b.get("nvidia_smi_utilization"), (int, float)) and b.get("nvidia_smi_samples")]
    total = sum(n for _, n in pairs)
    return round(sum(u * n for u, n in pairs) / total, 4) if total else None


def group(record: RunRecord, usages: Iterable[Usage], busy: Iterable[dict[str, Any]]) -> list[StageCost]:
    """The run's jobs in submission order, one entry per stage job (a job added later to the run joins its name, the
    chunks of an array join their stage); each busy file goes to the job that runs its stage."""
    costs: dict[str, StageCost] = {}
    by_id: dict[str, StageCost] = {}
    for job in record.jobs:
        name = stage_name(job)  # the chunks of a stage past MaxArraySize are one stage
        cost = costs.setdefault(name, StageCost(name, list(job.stages) or [name]))
        by_id[job.id] = cost
        if job.estimated_minutes is not None:
            cost.estimates.append(job.estimated_minutes)
    for usage in usages:
        if usage.job in by_id:
            by_id[usage.job].usages.append(usage)
    for item in busy:
        owner = next((cost for cost in costs.values() if item.get("stage") in cost.stages), None)
        if owner is not None:
            owner.busy.append(item)
    return list(costs.values())


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _spec(name: str) -> str:
    return f"jobs/{name}.yml"


def advice(stages: list[dict[str, Any]]) -> list[str]:
    """Lines a user acts on, each naming the job spec key to change (an inventory's snowpipe_job_overrides, where
    set, wins over the job spec: change it there)."""
    lines = []
    for s in stages:
        name, spec = s["name"], _spec(s["name"])
        asked, used = s["requested_mem_bytes"], s["max_rss_bytes"]
        if asked and used is not None and asked > MEMORY_SLACK * used and asked - used >= GIB // 2:
            suggest = max(1, -(-int(used * 1.5) // GIB))
            lines.append(f"{name}: asked {_size(asked)} of memory, its largest task used {_size(used)}: set "
                         f"`memory: {suggest}G` in {spec}")
        if s["states"].get("OUT_OF_MEMORY"):
            lines.append(f"{name}: {s['states']['OUT_OF_MEMORY']} task(s) ran out of memory ({_size(asked)} asked): "
                         f"raise `memory` in {spec}")
        efficiency, cpus = s["cpu_efficiency"], s["cpus"] or 0
        if efficiency is not None and efficiency < CPU_EFFICIENCY_LOW and cpus > 1:
            lines.append(f"{name}: CPU efficiency {efficiency:.0%} of {cpus} CPUs: lower `cpus` in {spec} (to about "
                         f"{max(1, round(cpus * efficiency * 1.5))})")
        busy = s["gpu_busy"]
        if busy is not None and busy < GPU_BUSY_LOW and (s["gpus"] or 0) > 0:
            more = ("raise `cpus` (data-loading workers) in " + spec if "train" in s["stages"] else
                    "raise `scenes_per_task` (the model loads once for several scenes) or `cpus` in " + spec)
            lines.append(f"{name}: the GPU was busy {busy:.0%} of the time: {more}")
        fraction = s["time_used_fraction"]
        if s["states"].get("TIMEOUT") or (fraction is not None and fraction > TIME_LIMIT_CLOSE):
            lines.append(f"{name}: a task used {min(fraction or 1, 1):.0%} of its time limit "
                         f"({_seconds(s['time_limit_s'])}): raise `time` in {spec}")
    return lines


def totals(stages: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = sum(s["cpu_hours"] or 0 for s in stages)
    used = sum(s["cpu_used_hours"] or 0 for s in stages)
    return {"cpu_hours": round(cpu, 6), "cpu_used_hours": round(used, 6),
            "cpu_efficiency": round(used / cpu, 4) if cpu else None,
            "gpu_hours": round(sum(s["gpu_hours"] or 0 for s in stages), 6),
            "tasks": sum(s["tasks"] for s in stages)}


NO_ACCOUNTING = ("no accounting on {host} (sacct: {why}): CPU-hours, GPU-hours, CPU efficiency, peak memory and queue "
                 "waits are unknown; shown are the stages' own timings (train and infer), nothing for the others")


def _fallback_stages(costs: list[StageCost]) -> list[dict[str, Any]]:
    """Without accounting: the tasks the busy files describe, their wall time and busy fraction; the rest null."""
    stages = []
    for cost in costs:
        walls = [float(b.get("wall_s") or 0) for b in cost.busy]
        base = StageCost(cost.name, cost.stages, busy=cost.busy).as_dict()
        stages.append({**base, "tasks": len(walls), "starts": len(walls), "states": {},
                       "elapsed_s": {"sum": round(sum(walls), 3), "median": statistics.median(walls) if walls
                                     else None, "max": max(walls, default=None)},
                       "cpu_hours": None, "cpu_used_hours": None, "cpu_efficiency": None, "gpu_hours": None,
                       "gpus": None})
    return stages


def read_busy(remote: ClusterConnection, record: RunRecord) -> list[dict[str, Any]]:
    """The busy files of the run (none yet: an empty list)."""
    script = 'for f in "$1"/results/busy/*.json; do [ -f "$f" ] && cat "$f" && echo; done; true'
    text = remote.run(["sh", "-c", script, "busy", record.remote_dir]).stdout
    decoder, at = json.JSONDecoder(), 0
    found: list[dict[str, Any]] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return found
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError:
            return found  # a file cut short: the rest is unreadable
        if isinstance(item, dict):
            found.append(item)


def build(record: RunRecord, remote: ClusterConnection) -> dict[str, Any]:
    """The report of one run as the JSON `--json` prints."""
    ids = sorted({job.id for job in record.jobs})
    if not ids:
        raise SnowpipeError(f"run {record.run_id} has no job recorded")
    result = remote.run(usage_command(ids))
    busy = read_busy(remote, record)
    report: dict[str, Any] = {"run": record.run_id, "host": record.host}
    if result.code != 0:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.code}"])[-1]
        report.update(source="stage timings", stages=_fallback_stages(group(record, [], busy)),
                      unknown=NO_ACCOUNTING.format(host=record.host, why=why))
    else:
        costs = group(record, parse_usage(result.stdout), busy)
        stages = [cost.as_dict() for cost in costs]
        missing = [cost.name for cost in costs if not cost.usages]
        report.update(source="sacct", stages=stages, unknown=(
            f"accounting has no record of {', '.join(missing)} (submitted before accounting was on, or purged)"
            if missing else None))
    report["total"] = totals(report["stages"])
    report["advice"] = advice(report["stages"]) if report["source"] == "sacct" else []
    return report


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    return f"{value // 3600}:{value % 3600 // 60:02d}:{value % 60:02d}"


def table(report: dict[str, Any]) -> Table:
    out = Table(title=f"run {report['run']} on {report['host']}: cost per stage (from {report['source']})",
                title_justify="left")
    for column in ("stage", "tasks", "elapsed sum / median / max", "queue wait max", "CPU-h alloc / used", "CPU eff",
                   "GPU-h", "GPU busy", "peak mem / asked", "time used"):
        out.add_column(column, justify="left" if column == "stage" else "right")
    for s in report["stages"]:
        e = s["elapsed_s"]
        states = ", ".join(f"{n} {state}" for state, n in sorted(s["states"].items()))
        out.add_row(s["name"], f"{s['tasks']}" + (f" ({states})" if states else ""),
                    f"{_seconds(e['sum'])} / {_seconds(e['median'])} / {_seconds(e['max'])}",
                    _seconds(s["queue_wait_s"]["max"]),
                    f"{_hours(s['cpu_hours'])} / {_hours(s['cpu_used_hours'])}", _fraction(s["cpu_efficiency"]),
                    _hours(s["gpu_hours"]), _fraction(s["gpu_busy"]),
                    f"{_size(s['max_rss_bytes'])} / {_size(s['requested_mem_bytes'])}",
                    _fraction(s["time_used_fraction"]))
    t = report["total"]
    out.add_row("total", str(t["tasks"]), "", "", f"{_hours(t['cpu_hours'])} / {_hours(t['cpu_used_hours'])}",
                _fraction(t["cpu_efficiency"]), _hours(t["gpu_hours"]), "", "", "", style="bold")
    return out


def write_png(report: dict[str, Any], target: Path) -> Path:
    """Three panels per stage: CPU-hours allocated and used, GPU-hours, peak memory against memory asked."""
    from matplotlib.figure import Figure

    from pipeline.plots import save_figure

    stages = report["stages"]
    names = [s["name"] for s in stages]
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    cpu, gpu, memory = figure.subplots(1, 3)
    x = list(range(len(names)))
    cpu.bar([i - 0.2 for i in x], [s["cpu_hours"] or 0 for s in stages], 0.4, label="allocated")
    cpu.bar([i + 0.2 for i in x], [s["cpu_used_hours"] or 0 for s in stages], 0.4, label="used (TotalCPU)")
    cpu.set_title("CPU-hours")
    cpu.legend(fontsize="small")
    gpu.bar(x, [s["gpu_hours"] or 0 for s in stages], 0.6, color="#8c564b")
    for i, s in zip(x, stages):
        if s["gpu_busy"] is not None:
            gpu.annotate(f"busy {s['gpu_busy']:.0%}", (i, s["gpu_hours"] or 0), ha="center", va="bottom",
                         fontsize="small")
    gpu.set_title("GPU-hours (busy: measured by the stage)")
    memory.bar([i - 0.2 for i in x], [(s["requested_mem_bytes"] or 0) / GIB for s in stages], 0.4, label="asked",
               color="#bbbbbb")
    memory.bar([i + 0.2 for i in x], [(s["max_rss_bytes"] or 0) / GIB for s in stages], 0.4, label="peak (MaxRSS)",
               color="#2ca02c")
    memory.set_title("memory per task, GiB")
    memory.legend(fontsize="small")
    for axes in (cpu, gpu, memory):
        axes.set_xticks(x, names, rotation=30, ha="right")
    figure.suptitle(f"run {report['run']} on {report['host']} (from {report['source']})")
    return save_figure(figure, target)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.data.writer import write_json
    from pipeline.monitor.ssh import ClusterConnection

    record = runs.load_record(args.run)
    with ClusterConnection(record) as remote:
        report = build(record, remote)
    folder = runs.RUNS_DIR / record.run_id / "results"
    if not args.no_png:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{REPORT_NAME}.json", report)
        report["png"] = str(write_png(report, folder / f"{REPORT_NAME}.png"))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table(report))
    for line in [report["unknown"]] if report.get("unknown") else []:
        console.print(f"note: {line}", markup=False, soft_wrap=True)
    for line in report["advice"]:
        console.print(f"advice: {line}", markup=False, soft_wrap=True)
    if not report["advice"] and report["source"] == "sacct":
        console.print("advice: none; every stage asked about what it used", markup=False)
    if report.get("png"):
        say(f"report: {report['png']} (and {REPORT_NAME}.json beside it)")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="what a run cost per stage: CPU-/GPU-hours, efficiency, memory, and advice",
        description="One sacct call over SSH for every job and array task of the run: per stage the tasks and their "
                    "states, elapsed time (sum, median, max), queue wait, CPU-hours allocated and used (TotalCPU) "
                    "and their ratio, peak memory (MaxRSS) against memory asked, GPU-hours (GPUs in AllocTRES x "
                    "elapsed), and the GPU's busy fraction that train and infer measure themselves; totals for the "
                    "run, and advice naming the job spec key to change. Writes runs/RUN/results/report.json and "
                    "report.png. Without accounting on the cluster it shows the stages' own timings and says what "
                    "it cannot know.")
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (stages[] with name, tasks, cpu_hours, gpu_hours, cpu_efficiency, "
                        "max_rss_bytes, requested_mem_bytes, gpu_busy; total.cpu_hours, total.gpu_hours)")
    p.add_argument("--no-png", action="store_true", help="write neither report.png nor report.json")
    p.set_defaults(func=cmd_report)
