"""`snowpipe probe`: ask the inventory's cluster over SSH what it offers, and keep the answer for the planner.

Four commands on the login node (`probe_parsers` builds and reads them): `scontrol show config` (MaxArraySize,
MaxJobCount, MinJobAge, accounting), `sinfo` (partitions, time limits, nodes, CPUs, memory, GPU types), and where
the user may read them `sacctmgr show qos` and `show assoc` (submit limits, MaxTRES). What could not be read is
listed under `partial`, never guessed. The facts go to `.snowpipe/cluster-facts/<host>.json`
(pipeline/cluster_facts.py).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from pipeline.cluster_facts import facts_path, save_facts
from pipeline.contract.run_record import Connection, RunRecord
from pipeline.errors import ConfigError, SnowpipeError
from pipeline.inventory import DEFAULT_INVENTORY, inventory_host_vars
from pipeline.monitor import probe_parsers as parsers
from pipeline.progress import say

if TYPE_CHECKING:
    from pipeline.monitor.ssh import ClusterConnection

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
CONNECTION_KEYS = ("snowpipe_known_hosts", "ansible_host", "ansible_port", "ansible_user",
                   "ansible_ssh_private_key_file")


def _first_line(text: str, default: str) -> str:
    return (text.strip().splitlines() or [default])[-1]


def probe(remote: ClusterConnection, host: str) -> dict[str, Any]:
    """The cluster's facts; scontrol and sinfo must answer, sacctmgr may refuse (partial facts, said so)."""
    partial: list[str] = []
    config = remote.run(parsers.CONFIG_COMMAND)
    if config.code != 0:
        raise SnowpipeError(f"`scontrol show config` fails on {host}: {_first_line(config.stderr, 'no output')}; "
                            f"is it a SLURM login node?")
    values = parsers.parse_config(config.stdout)
    storage = values.get("AccountingStorageType", "")
    facts: dict[str, Any] = {
        "probed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_version": values.get("SLURM_VERSION"),
        "cluster_name": values.get("ClusterName"),
        "max_array_size": parsers.leading_int(values.get("MaxArraySize", "")),
        "max_job_count": parsers.leading_int(values.get("MaxJobCount", "")),
        "min_job_age_s": parsers.leading_int(values.get("MinJobAge", "")),
        "accounting": bool(storage) and not storage.endswith("/none"),
        "accounting_storage": storage or None,
    }
    sinfo = remote.run(parsers.SINFO_COMMAND)
    if sinfo.code != 0:
        raise SnowpipeError(f"`sinfo` fails on {host}: {_first_line(sinfo.stderr, 'no output')}")
    facts["partitions"] = [partition.as_dict() for partition in parsers.parse_sinfo(sinfo.stdout)]
    facts.update(qos=None, associations=None, max_submit_jobs=None)
    if not facts["accounting"]:
        partial.append("no accounting (AccountingStorageType is none): no QOS or association limits, and no "
                       "`snowpipe report` beyond the stages' own timings")
    else:
        qos = remote.run(parsers.QOS_COMMAND)
        user = remote.run(["id", "-un"]).stdout.strip()
        assoc = remote.run(parsers.assoc_command(user)) if user else qos
        if qos.code != 0 or assoc.code != 0:
            failed = qos if qos.code != 0 else assoc
            partial.append(f"sacctmgr refused ({_first_line(failed.stderr, 'no output')}): QOS and association "
                           f"limits unknown")
        else:
            limits = parsers.parse_qos(qos.stdout)
            associations = parsers.parse_assoc(assoc.stdout)
            usable = {name for a in associations for name in a.qos} or {limit.name for limit in limits}
            submit = [a.max_submit_jobs for a in associations] + \
                [limit.max_submit_jobs for limit in limits if limit.name in usable]
            facts["qos"] = [vars(limit) | {"qos": list(limit.qos)} for limit in limits]
            facts["associations"] = [vars(a) | {"qos": list(a.qos)} for a in associations]
            facts["max_submit_jobs"] = min((n for n in submit if n is not None), default=None)
    facts["partial"] = partial
    return facts


def _gpus(gpus: dict[str, int]) -> str:
    return ", ".join(f"{count} x {kind or 'gpu'}" for kind, count in gpus.items()) or "-"


def print_facts(facts: dict[str, Any], saved: Path) -> None:
    console = Console(highlight=False)
    console = console if console.is_terminal else Console(highlight=False, width=140)  # a file or a pipe
    table = Table(title=f"{facts['host']}: SLURM {facts.get('slurm_version') or '?'}, MaxArraySize "
                        f"{facts.get('max_array_size')}, MaxJobCount {facts.get('max_job_count')}, MinJobAge "
                        f"{facts.get('min_job_age_s')} s, accounting {'on' if facts.get('accounting') else 'off'}, "
                        f"submit limit {facts.get('max_submit_jobs') or 'none found'}", title_justify="left")
    for column in ("partition", "state", "time limit", "nodes", "CPUs/node", "memory/node", "GPUs/node"):
        table.add_column(column)
    for p in facts["partitions"]:
        limit = p["time_limit_s"]
        table.add_row(p["name"] + (" (default)" if p["default"] else ""), "up" if p["available"] else "down",
                      "infinite" if limit is None else f"{limit // 3600}:{limit % 3600 // 60:02d}:00",
                      str(p["nodes"]), str(p["cpus_per_node"]), f"{p['memory_mb_per_node']} MB", _gpus(p["gpus"]))
    console.print(table)
    for qos in facts.get("qos") or []:
        console.print(f"QOS {qos['name']}: MaxSubmitJobsPerUser {qos['max_submit_jobs'] or '-'}, MaxJobsPerUser "
                      f"{qos['max_jobs'] or '-'}, MaxTRES {qos['max_tres_per_job'] or '-'}", markup=False)
    for line in facts.get("partial") or []:
        console.print(f"partial: {line}", markup=False, soft_wrap=True)
    say(f"probe: facts saved to {saved}; `snowpipe plan` checks jobs against them")


def _connection(args: argparse.Namespace) -> tuple[str, RunRecord]:
    """The host and its connection, from --connection (what the playbook passes) or the inventory."""
    if args.connection:
        try:
            conn = Connection.model_validate_json(args.connection)
        except ValidationError as exc:
            raise ConfigError(f"--connection: not a connection object ({exc.error_count()} problem(s))") from None
    else:
        host, found = inventory_host_vars(Path(args.inventory), args.host, CONNECTION_KEYS)
        conn = Connection(host=host, address=str(found.get("ansible_host") or host),
                          port=int(found.get("ansible_port") or 22), user=str(found.get("ansible_user") or ""),
                          key=str(found.get("ansible_ssh_private_key_file") or ""),
                          known_hosts=str(found.get("snowpipe_known_hosts") or ""))
    return conn.host, RunRecord(run_id="probe", host=conn.host, address=conn.address or conn.host, port=conn.port,
                                user=conn.user, key=conn.key, known_hosts=conn.known_hosts, remote_dir="")


def cmd_probe(args: argparse.Namespace) -> int:
    from pipeline.monitor.ssh import ClusterConnection

    host, record = _connection(args)
    with ClusterConnection(record) as remote:
        facts = probe(remote, host)
    saved = save_facts(PROJECT_ROOT, host, facts)
    facts = {**facts, "host": host}
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        print_facts(facts, saved)
    return 0


def add_probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="ask the cluster what it offers (partitions, GPUs, limits) and keep it for the plan",
        description="Over SSH: `scontrol show config` (MaxArraySize, MaxJobCount, MinJobAge, accounting), `sinfo` "
                    "(partitions with their time limits, nodes, CPUs, memory, GPU types and counts) and, where the "
                    "user may read them, sacctmgr's QOS and association limits (MaxSubmitJobs, MaxTRES). Saves the "
                    f"facts to {facts_path(Path('.'), 'HOST')} (git-ignored); `snowpipe plan` and the playbook "
                    "refuse a job the cluster cannot run, and take MaxArraySize from them when the inventory does "
                    "not set it. Run it again when the cluster changes.")
    p.add_argument("-i", "--inventory", default=str(DEFAULT_INVENTORY),
                   help="Ansible inventory of the cluster (default: inventory/local.yml)")
    p.add_argument("--host", help="inventory host (default: the first of group `cluster`)")
    p.add_argument("--connection", metavar="JSON", help="the connection as JSON (host, address, port, user, key, "
                                                        "known_hosts: what the playbook passes) instead of the "
                                                        "inventory")
    p.add_argument("--json", action="store_true", help="print the facts as JSON (max_array_size, partitions, ...)")
    p.set_defaults(func=cmd_probe)
