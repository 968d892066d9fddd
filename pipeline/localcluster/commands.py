"""`snowpipe cluster up|down|status`: the command-line face of the embedded local cluster (`embedded.py`)."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table

from pipeline.localcluster import embedded
from pipeline.progress import say

EXIT_STOPPED = 3
"""`status` exit code when the cluster is stopped or only partly running (like `systemctl status`)."""


def cmd_cluster_up(args: argparse.Namespace) -> int:
    info = embedded.up(accounting=args.accounting, timeout=args.timeout)
    say(f"connect: {' '.join(info.ssh_command())}")
    say(f"locally: export SLURM_CONF={info.slurm_conf}")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    embedded.down(timeout=args.timeout)
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    state = embedded.status()
    info = state.info
    table = Table()
    table.add_column("daemon")
    table.add_column("state")
    table.add_column("pid", justify="right")
    for daemon, pid in state.pids.items():
        table.add_row(daemon, "[green]running[/]" if pid else "[red]stopped[/]", str(pid or "-"))
    out = Console(highlight=False)
    out.print(f"embedded cluster in {embedded.cluster_dir()}", markup=False, soft_wrap=True)
    out.print(table)
    node_state = state.node_state or "unknown (slurmctld not answering)"
    out.print(f"node {info.node} (partition {info.partition}): {node_state}", markup=False)
    out.print(embedded.accounting_line(state.accounting, state.sacct_works), markup=False, soft_wrap=True)
    out.print(f"ssh:        {shlex.join(info.ssh_command())}", markup=False, soft_wrap=True)
    out.print(f"SLURM_CONF: export SLURM_CONF={info.slurm_conf}", markup=False, soft_wrap=True)
    out.print(f"remote root: {info.remote_root}", markup=False, soft_wrap=True)
    if state.all_running:
        return 0
    say("cluster: stopped; start it with `snowpipe cluster up`" if not state.any_running else
        "cluster: partly running; `snowpipe cluster up` starts the missing daemons")
    return EXIT_STOPPED


def add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cluster up|down|status` to the `snowpipe` command's subparsers."""
    cluster = sub.add_parser(
        "cluster", help="start/stop the embedded local SLURM cluster (sshd + munge + slurmctld + slurmd, "
                        "and slurmdbd + MariaDB for sacct unless --no-accounting)",
        description="This machine as a one-node SLURM cluster reachable over SSH on 127.0.0.1:2222, the default "
                    "target of ansible/submit.yml. Files live in .cluster/ at the repository root "
                    "(or $SNOWPIPE_CLUSTER_DIR).")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "up", help="start the cluster (idempotent); installs missing Debian packages when root",
        description="Write config and keys under .cluster/ (existing keys are kept), start munged, slurmctld, "
                    "slurmd and sshd, and wait until the node is idle and ssh with host-key checking works. "
                    "Daemons that already run are left alone. Unless --no-accounting, also a MariaDB of the "
                    "cluster's own (.cluster/mysql/, 127.0.0.1:3307) and slurmdbd (port 6819), so sacct and "
                    "`snowpipe report` work; switching it on a running cluster restarts slurmctld and slurmd "
                    "(jobs are kept).")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node and ssh (default 60)")
    p.add_argument("--accounting", action=argparse.BooleanOptionalAction, default=True,
                   help="run slurmdbd + MariaDB so sacct and `snowpipe report` work (the default; installs slurmdbd "
                        "and mariadb-server when missing); --no-accounting starts quicker without them (and stops "
                        "them on a running cluster)")
    p.set_defaults(func=cmd_cluster_up)

    p = actions.add_parser(
        "down", help="stop the daemons `cluster up` started; keys, config and job state are kept",
        description="Stop sshd, slurmd, slurmctld, slurmdbd, MariaDB and munged by their pid files in "
                    ".cluster/pids/ (SIGTERM, then SIGKILL after --timeout). Nothing else on the machine is touched; "
                    "the accounting database stays for the next `up`.")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait per daemon before SIGKILL")
    p.set_defaults(func=cmd_cluster_down)

    p = actions.add_parser(
        "status", help="which daemons run, the node state, and how to connect; exit 0 when up, 3 otherwise",
        description="Show each daemon's state and pid, the node state from sinfo, whether accounting (sacct) is "
                    "on, the ssh command line and the "
                    "SLURM_CONF to export. Exit code 0 when everything runs, 3 when stopped or partly running.")
    p.set_defaults(func=cmd_cluster_status)
