"""Can the cluster run the planned jobs? Checked against the probed facts (`snowpipe probe`) before any data moves.

A job asking a partition the cluster lacks, a GPU type no node of its partition has, more GPUs, CPUs or memory
than one node offers, or a longer time than the partition allows would be refused by sbatch, after the data was
sent. Each problem is one line naming the job, the job spec key and what the cluster offers. Without facts for
the host nothing is checked (sbatch still is).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from pipeline.cluster_facts import slurm_megabytes, slurm_seconds


class PlannedJob(Protocol):
    """What the check reads of a planned job (pipeline.contract.plan.PlannedJob has it)."""

    @property
    def name(self) -> str: ...

    @property
    def sbatch(self) -> Mapping[str, Any]: ...


def requested_gpus(sbatch: Mapping[str, Any]) -> tuple[str, int]:
    """(type or "", count) from `--gres=gpu[:type]:N[,...]` or `--gpus=[type:]N`; ("", 0) when none."""
    if sbatch.get("gpus"):
        parts = str(sbatch["gpus"]).split(":")
        return (parts[0], int(parts[1])) if len(parts) == 2 else ("", int(parts[0]))
    for item in str(sbatch.get("gres") or "").split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            return (parts[1] if len(parts) >= 3 else "", int(parts[-1]))
    return "", 0


def _offers_gpus(gpus: dict[str, int]) -> str:
    return ", ".join(f"{count} x {kind or 'untyped'}" for kind, count in gpus.items()) or "no GPUs"


def _clock(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _partition(job: PlannedJob, partitions: list[dict[str, Any]], host: str) -> tuple[dict[str, Any] | None, str]:
    """The partition the job runs in (its own, else the cluster's default) and a problem line when it has none."""
    names = ", ".join(p["name"] + (" (default)" if p.get("default") else "") for p in partitions)
    asked = job.sbatch.get("partition")
    if asked:
        for name in str(asked).split(","):  # sbatch takes a list: the first that can run it
            found = next((p for p in partitions if p["name"] == name), None)
            if found is not None:
                return found, ""
        return None, (f"job {job.name}: partition {asked!r} (key `partition`) does not exist on {host}; it offers: "
                      f"{names}")
    default = next((p for p in partitions if p.get("default")), None)
    if default is None and partitions:
        return None, f"job {job.name}: no `partition` set and {host} has no default partition; it offers: {names}"
    return default, ""


def job_problems(job: PlannedJob, facts: dict[str, Any]) -> list[str]:
    """What of `job`'s request the cluster cannot give, one line each."""
    host = facts.get("host", "the cluster")
    partitions = facts.get("partitions") or []
    if not partitions:
        return []
    partition, problem = _partition(job, partitions, host)
    if partition is None:
        return [problem]
    where, problems = f"partition {partition['name']} of {host}", []
    kind, count = requested_gpus(job.sbatch)
    gpus: dict[str, int] = partition.get("gpus") or {}
    if count:
        if not gpus:
            problems.append(f"job {job.name}: asks {count} GPU(s) (key `gpus`) but {where} has none; pick a "
                            f"partition with GPUs (key `partition`)")
        elif kind and kind not in gpus:
            problems.append(f"job {job.name}: GPU type {kind!r} (key `gpu_type`) is not in {where}; it offers "
                            f"{_offers_gpus(gpus)} per node")
        elif count > (gpus[kind] if kind else max(gpus.values())):
            problems.append(f"job {job.name}: {count} GPUs (key `gpus`) but a node of {where} has at most "
                            f"{_offers_gpus(gpus)}")
    limit, asked_time = partition.get("time_limit_s"), slurm_seconds(str(job.sbatch.get("time") or ""))
    if limit is not None and asked_time is not None and asked_time > limit:
        problems.append(f"job {job.name}: time {job.sbatch['time']} (key `time`) exceeds the {_clock(limit)} "
                        f"{where} allows")
    memory, node_memory = slurm_megabytes(str(job.sbatch.get("mem") or "0")), partition.get("memory_mb_per_node")
    if memory and node_memory and memory > node_memory:
        problems.append(f"job {job.name}: memory {job.sbatch['mem']} (key `memory`) exceeds the {node_memory} MB "
                        f"a node of {where} has")
    cpus = int(job.sbatch.get("cpus-per-task") or 1) * int(job.sbatch.get("ntasks-per-node") or 1)
    node_cpus = partition.get("cpus_per_node")
    if node_cpus and cpus > node_cpus:
        problems.append(f"job {job.name}: {cpus} CPUs (key `cpus`{', times gpus' if cpus != 1 and count > 1 else ''})"
                        f" exceed the {node_cpus} a node of {where} has")
    return problems


def plan_problems(jobs: Iterable[PlannedJob], facts: dict[str, Any] | None) -> list[str]:
    """Every planned job's problems against the facts; none when no facts are known."""
    if not facts:
        return []
    return [line for job in jobs for line in job_problems(job, facts)]


def refusal(problems: list[str], host: str) -> str:
    """The one message `snowpipe plan` stops with."""
    shown = "\n  ".join(problems)
    return (f"the cluster {host} cannot run this plan (facts from `snowpipe probe`; run it again if the cluster "
            f"changed):\n  {shown}\nchange those keys in jobs/*.yml or the inventory's snowpipe_job_overrides")

