"""What `scontrol show config`, `sinfo` and `sacctmgr` say of a cluster's limits, read into plain values.

The commands are built here and run by `probe` over SSH; each `parse_*` reads exactly its command's stdout.
Formats read (tests/test_usage_parsers.py): SLURM 22.05 as recorded from the embedded cluster, and the later
versions' documented forms (typed GPUs with sockets `gpu:a100:4(S:0-1)`, heterogeneous nodes `64+`, time limits
with days).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.cluster_facts import slurm_seconds

CONFIG_COMMAND = ["scontrol", "show", "config"]
SINFO_FORMAT = "%P|%a|%l|%D|%c|%m|%G"
"""partition (`*` marks the default), availability, time limit, nodes, CPUs per node, memory per node (MB), gres."""
SINFO_COMMAND = ["sinfo", "--noheader", f"--format={SINFO_FORMAT}"]
QOS_FORMAT = "Name,MaxSubmitJobsPerUser,MaxJobsPerUser,MaxTRESPerJob,MaxWallDurationPerJob"
QOS_COMMAND = ["sacctmgr", "--noheader", "--parsable2", "show", "qos", f"format={QOS_FORMAT}"]
ASSOC_FORMAT = "Account,Partition,QOS,MaxSubmitJobs,MaxJobs,MaxTRES"


def assoc_command(user: str) -> list[str]:
    """The user's associations (their own limits and the QOS they may use)."""
    return ["sacctmgr", "--noheader", "--parsable2", "show", "assoc", "where", f"user={user}",
            f"format={ASSOC_FORMAT}"]


_CONFIG_LINE = re.compile(r"^(\w+)\s*=\s*(.*?)\s*$")


def parse_config(text: str) -> dict[str, str]:
    """`Key = Value` lines of `scontrol show config` -> {Key: Value}."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _CONFIG_LINE.match(line)
        if match:
            values.setdefault(match[1], match[2])
    return values


def leading_int(text: str) -> int | None:
    """`300 sec` -> 300, `64+` -> 64, `(null)` / `N/A` / "" -> None."""
    match = re.match(r"^\s*(\d+)", text)
    return int(match[1]) if match else None


def time_limit_s(text: str) -> int | None:
    """sinfo / sacctmgr time: `infinite` -> None, `30:00`, `4:00:00`, `1-00:00:00`, `5` (minutes) -> seconds."""
    return slurm_seconds(text)


def parse_gres(text: str) -> dict[str, int]:
    """GPUs per node by type ("" for untyped): `gpu:2` -> {"": 2}, `gpu:a100:4(S:0-1),gpu:v100:2` ->
    {"a100": 4, "v100": 2}; other gres and `(null)` are left out."""
    gpus: dict[str, int] = {}
    for item in re.split(r",(?![^(]*\))", text):
        parts = re.sub(r"\(.*\)$", "", item.strip()).split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        kind, count = (parts[1], parts[2]) if len(parts) >= 3 else ("", parts[1])
        number = leading_int(count)
        if number is not None:
            gpus[kind] = max(gpus.get(kind, 0), number)
    return gpus


@dataclass
class Partition:
    name: str
    default: bool = False
    available: bool = True
    time_limit_s: int | None = None
    """None: infinite."""
    nodes: int = 0
    cpus_per_node: int = 0
    """The largest node's."""
    memory_mb_per_node: int = 0
    """The largest node's."""
    gpus: dict[str, int] = field(default_factory=dict)
    """GPUs per node by type ("" untyped), the most any node has."""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "default": self.default, "available": self.available,
                "time_limit_s": self.time_limit_s, "nodes": self.nodes, "cpus_per_node": self.cpus_per_node,
                "memory_mb_per_node": self.memory_mb_per_node, "gpus": dict(self.gpus)}


def parse_sinfo(text: str) -> list[Partition]:
    """One partition per name; sinfo writes one line per group of alike nodes, which add up here."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 7:
            continue
        name, available, limit, nodes, cpus, memory, gres = parts
        default = name.endswith("*")
        name = name.rstrip("*")
        partition = found.setdefault(name, Partition(name, default=default, available=available == "up",
                                                     time_limit_s=time_limit_s(limit)))
        partition.nodes += leading_int(nodes) or 0
        partition.cpus_per_node = max(partition.cpus_per_node, leading_int(cpus) or 0)
        partition.memory_mb_per_node = max(partition.memory_mb_per_node, leading_int(memory) or 0)
        for kind, count in parse_gres(gres).items():
            partition.gpus[kind] = max(partition.gpus.get(kind, 0), count)
    return list(found.values())


@dataclass(frozen=True)
class Limit:
    """One QOS or association's limits; None where it sets none."""

    name: str
    max_submit_jobs: int | None
    max_jobs: int | None
    max_tres_per_job: str
    max_wall_s: int | None = None
    qos: tuple[str, ...] = ()
    """An association's QOS, which its jobs may use."""


def parse_qos(text: str) -> list[Limit]:
    """`QOS_COMMAND`'s output."""
    limits = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0]:
            continue
        name, submit, jobs, tres, wall = parts
        limits.append(Limit(name, leading_int(submit), leading_int(jobs), tres, time_limit_s(wall)))
    return limits


def parse_assoc(text: str) -> list[Limit]:
    """`assoc_command`'s output; the name is `account` or `account/partition`."""
    limits = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        account, partition, qos, submit, jobs, tres = parts
        limits.append(Limit(f"{account}/{partition}" if partition else account, leading_int(submit),
                            leading_int(jobs), tres, qos=tuple(filter(None, qos.split(",")))))
    return limits
