"""The embedded local cluster: this machine as a one-node SLURM cluster reachable over SSH on 127.0.0.1:2222.

Four daemons (munged, slurmctld, slurmd, sshd) run from files under `cluster_dir()`, each with its own pid file,
so `down()` stops exactly what `up()` started and never touches the machine's own services. `up()` is idempotent:
it writes what is missing, keeps existing keys (known_hosts stays valid) and starts only daemons that are not
running. With accounting (the default; `up(accounting=False)` for a quick start, persisted in
`.cluster/accounting`) two more run before slurmctld: a MariaDB of the cluster's own and slurmdbd, so that `sacct`
works (see `embedded_accounting.py`).
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SnowpipeError
from pipeline.localcluster import embedded_accounting
from pipeline.localcluster.embedded_files import (
    HOST,
    MARIADB_PORT,
    PARTITION,
    SLURMCTLD_PORT,
    SLURMD_PORT,
    SLURMDBD_PORT,
    SSH_PORT,
    SYSTEM_PATH,
    ClusterPaths,
    cluster_dir,
    ensure_packages,
    missing_packages,
    node_name,
    slurm_conf_accounting,
    which_program,
    write_files,
)
from pipeline.progress import say
from pipeline.ssh_options import SshOptions, login

__all__ = ["ACCOUNTING_DAEMONS", "ALL_DAEMONS", "ClusterInfo", "ClusterStatus", "DAEMONS", "accounting_enabled",
           "cluster_dir", "cluster_info", "down", "is_up", "missing_packages", "status", "up", "write_files"]

DAEMONS = ("munged", "slurmctld", "slurmd", "sshd")
"""The daemons every cluster runs, in start order."""
ACCOUNTING_DAEMONS = ("mariadbd", "slurmdbd")
"""The two more that accounting runs, started after munged and before slurmctld."""
ALL_DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sshd")
"""Start order; `down()` stops them in reverse (slurmctld hands its last job records to slurmdbd first)."""

READY_STATES = {"idle", "mix", "alloc"}
RESUMABLE_STATES = {"down", "drain", "drng", "fail", "inval"}

Report = Callable[[str], None]
"""Where progress lines go (`say` by default; a list's append in tests)."""


@dataclass(frozen=True)
class ClusterInfo:
    """How to reach the embedded cluster: what an inventory, a test or `ssh` needs."""

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    slurm_conf: Path
    node: str
    partition: str
    remote_root: Path
    accounting: bool = False
    """slurmdbd records jobs: `sacct` works (locally with `env()`, and over ssh)."""

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for running sbatch / squeue / scontrol on this machine."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def ssh_options(self) -> SshOptions:
        """This cluster's key and known_hosts with the options of every connection (inventory/local.yml's too)."""
        return SshOptions.of(self.port, self.key, self.known_hosts)

    def ssh_command(self, *remote: str) -> list[str]:
        """`ssh` to this cluster, host keys checked, never prompting."""
        return self.ssh_options().command(login(self.host, self.user), *remote)


@dataclass
class ClusterStatus:
    """Which daemons run (pid or None) and the node state sinfo reports (None when slurmctld does not answer).

    `pids` names the accounting daemons too when accounting is on or one of them still runs.
    """

    info: ClusterInfo
    pids: dict[str, int | None] = field(default_factory=dict)
    node_state: str | None = None

    @property
    def accounting(self) -> bool:
        """Accounting is the cluster's choice (`up --accounting`); `sacct_works` says whether it runs too."""
        return self.info.accounting

    @property
    def sacct_works(self) -> bool:
        return self.accounting and all(self.pids.get(daemon) for daemon in ("munged", *ACCOUNTING_DAEMONS))

    @property
    def all_running(self) -> bool:
        return all(pid is not None for pid in self.pids.values())

    @property
    def any_running(self) -> bool:
        return any(pid is not None for pid in self.pids.values())


def accounting_enabled(paths: ClusterPaths | None = None) -> bool:
    """The persisted choice: whether `up()` without `accounting=` runs slurmdbd + MariaDB (on for a new cluster:
    without it a finished run leaves nothing for `sacct` and `snowpipe report`)."""
    paths = paths or ClusterPaths.default()
    try:
        return paths.accounting_choice.read_text().strip() != "off"
    except OSError:
        return True


def cluster_info(paths: ClusterPaths | None = None) -> ClusterInfo:
    """The connection facts; valid whether or not the cluster runs."""
    paths = paths or ClusterPaths.default()
    return ClusterInfo(host=HOST, port=SSH_PORT, user=getpass.getuser(), key=paths.user_key,
                       known_hosts=paths.known_hosts, slurm_conf=paths.slurm_conf, node=node_name(),
                       partition=PARTITION, remote_root=paths.remote_root, accounting=accounting_enabled(paths))


def _daemons(accounting: bool) -> list[str]:
    return [daemon for daemon in ALL_DAEMONS if accounting or daemon not in ACCOUNTING_DAEMONS]


# ---------------------------------------------------------------- processes


def daemon_pid(paths: ClusterPaths, daemon: str) -> int | None:
    """The pid in the daemon's pid file when that process is alive and is ours: its command names our folder, or
    (slurmdbd, which takes no config argument) its environment names our slurm.conf."""
    try:
        pid = int(paths.pid(daemon).read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        ours = str(paths.root) in cmdline or \
            f"SLURM_CONF={paths.slurm_conf}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if comm != daemon or not ours:
        return None
    return pid


def is_up(paths: ClusterPaths | None = None) -> bool:
    """True when the four daemons run, and the two accounting ones when accounting is on (what a test fixture
    checks before deciding whether to stop the cluster later)."""
    paths = paths or ClusterPaths.default()
    return all(daemon_pid(paths, daemon) is not None for daemon in _daemons(accounting_enabled(paths)))


def _daemon_argv(paths: ClusterPaths, daemon: str, node: str) -> list[str]:
    program = which_program(daemon) or daemon
    if daemon == "munged":
        return [program, "--force", f"--socket={paths.munge_socket}", f"--key-file={paths.munge_key}",
                f"--pid-file={paths.pid('munged')}", f"--log-file={paths.log('munged')}",
                f"--seed-file={paths.munge_seed}"]
    if daemon == "slurmctld":
        return [program, "-f", str(paths.slurm_conf)]
    if daemon == "slurmd":
        return [program, "-f", str(paths.slurm_conf), "-N", node]
    if daemon == "slurmdbd":  # reads slurmdbd.conf from $SLURM_CONF's folder
        return [program]
    if daemon == "mariadbd":
        return embedded_accounting.mariadbd_argv(paths)
    return ["/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else program,  # sshd re-exec needs an absolute path
            "-f", str(paths.sshd_config), "-E", str(paths.log("sshd"))]


PORTS = {"slurmctld": ("0.0.0.0", SLURMCTLD_PORT), "slurmd": ("0.0.0.0", SLURMD_PORT), "sshd": (HOST, SSH_PORT),
         "slurmdbd": ("0.0.0.0", SLURMDBD_PORT), "mariadbd": (HOST, MARIADB_PORT)}  # slurmdbd ignores DbdAddr


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 2) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return " | last lines: " + " | ".join(tail) if tail else ""


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _check_ports(daemons: list[str]) -> None:
    """Fail before starting anything when another program holds one of our ports."""
    for daemon in daemons:
        if daemon in PORTS and not _port_free(*PORTS[daemon]):
            host, port = PORTS[daemon]
            raise SnowpipeError(f"cannot start {daemon}: port {host}:{port} is taken by a process that is not this "
                                f"cluster's (see `ss -ltnp 'sport = :{port}'`); stop it and retry")


def _start(paths: ClusterPaths, daemon: str, node: str, env: dict[str, str], timeout: float) -> int:
    """Start one daemon (it forks into the background itself) and wait for its pid file."""
    _check_ports([daemon])
    paths.pid(daemon).unlink(missing_ok=True)
    log = paths.log(daemon)
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: the forked daemon may keep it open
        done = subprocess.run(_daemon_argv(paths, daemon, node), env=env, cwd=paths.root, stdin=subprocess.DEVNULL,
                              stdout=output, stderr=output, start_new_session=True)
        output.seek(0)
        said = output.read().decode(errors="replace").strip()
    if done.returncode != 0:
        raise SnowpipeError(f"{daemon} did not start (exit {done.returncode}): {said or 'no output'}; "
                            f"read {log}{_log_tail(log)}")
    if not _wait(lambda: daemon_pid(paths, daemon) is not None, timeout):
        raise SnowpipeError(f"{daemon} did not write its pid file within {timeout:.0f} s: read {log}"
                            f"{_log_tail(log)}")
    if daemon == "munged" and not _wait(paths.munge_socket.exists, timeout):
        raise SnowpipeError(f"munged did not create {paths.munge_socket}: read {log}{_log_tail(log)}")
    if daemon == "mariadbd" and not _wait(paths.mysql_socket.exists, timeout):
        raise SnowpipeError(f"mariadbd did not create {paths.mysql_socket}: read {log}{_log_tail(log)}")
    return daemon_pid(paths, daemon) or 0


def _node_state(info: ClusterInfo) -> str | None:
    try:
        done = subprocess.run(["sinfo", "-h", "-n", info.node, "-o", "%t"], env=info.env(), capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def _wait_for_node(info: ClusterInfo, paths: ClusterPaths, timeout: float) -> str:
    """Until sinfo shows the node ready; a node that is down or drained (not just unreachable) is resumed."""
    deadline = time.monotonic() + timeout
    state, resumed_at = None, 0.0
    while time.monotonic() < deadline:
        state = _node_state(info)
        if state in READY_STATES:
            return state
        if state and state.rstrip("*~#$@%!^-+") in RESUMABLE_STATES and not state.endswith("*") \
                and time.monotonic() - resumed_at > 3:
            subprocess.run(["scontrol", "update", f"nodename={info.node}", "state=resume"], env=info.env(),
                           capture_output=True, timeout=15)
            resumed_at = time.monotonic()
        time.sleep(0.5)
    daemon = "slurmctld" if state is None else "slurmd"
    raise SnowpipeError(f"node {info.node} is {state or 'not reported by slurmctld'} after {timeout:.0f} s: "
                        f"read {paths.log(daemon)} (and `SLURM_CONF={info.slurm_conf} scontrol show node`)"
                        f"{_log_tail(paths.log(daemon))}")


def _ssh_works(info: ClusterInfo) -> bool:
    try:
        return subprocess.run(info.ssh_command("true"), capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _apply_changes(paths: ClusterPaths, info: ClusterInfo, changed: list[str], report: Report, *,
                   reconfigure: bool) -> None:
    """A running cluster picks up a new slurm.conf (e.g. another MinJobAge) with `scontrol reconfigure`."""
    if "slurm.conf" in changed and reconfigure:
        done = subprocess.run(["scontrol", "reconfigure"], env=info.env(), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise SnowpipeError(f"slurm.conf changed but `scontrol reconfigure` failed: {done.stderr.strip()}; "
                                f"read {paths.log('slurmctld')}")
        report("cluster: slurm.conf changed; slurmctld and slurmd reconfigured")
    others = [name for name in changed if name != "slurm.conf"]
    if others:
        report(f"cluster: {', '.join(others)} changed; `snowpipe cluster down && snowpipe cluster up` applies it")


def accounting_line(accounting: bool, sacct_works: bool = True) -> str:
    """`accounting: on (sacct works)` / `accounting: off`, as `up` and `status` say it."""
    if not accounting:
        return "accounting: off (sacct unavailable; `snowpipe cluster up` turns it on)"
    return "accounting: on (sacct works)" if sacct_works else \
        "accounting: on, but slurmdbd or MariaDB is stopped (sacct fails; `snowpipe cluster up` starts them)"


# noqa below: one transaction, start and rollback; split up, the rollback would need every step's state.
def up(*, accounting: bool | None = None, min_job_age: int = 300, timeout: float = 60.0,  # noqa: PLR0915
       paths: ClusterPaths | None = None, report: Report = say) -> ClusterInfo:
    """Start the cluster (idempotent) and return once the node is ready and ssh with host-key checking works.

    `accounting=True` also runs MariaDB and slurmdbd (sacct works), `False` runs without them (and stops them);
    on a running cluster a switch restarts slurmctld and slurmd (jobs and queue survive). `None`, the default,
    keeps the cluster's choice, stored in `.cluster/accounting` (on for a new cluster; `snowpipe cluster up`
    passes True unless told --no-accounting).
    """
    paths = paths or ClusterPaths.default()
    before = accounting_enabled(paths)
    want = before if accounting is None else accounting
    if os.geteuid() != 0:
        if is_up(paths) and want == before:
            report(f"cluster: already running ({paths.root}); {accounting_line(want)}")
            return cluster_info(paths)
        ensure_packages(report, accounting=want)
        raise SnowpipeError("the embedded cluster runs munged, slurmctld and slurmd as root (SlurmUser=root) and "
                            "creates device nodes: run `snowpipe cluster up` as root")
    ensure_packages(report, accounting=want)
    running = {daemon for daemon in ALL_DAEMONS if daemon_pid(paths, daemon) is not None}
    conf_accounting = paths.slurm_conf.exists() and slurm_conf_accounting(paths.slurm_conf.read_text())
    switch = sorted({"slurmctld", "slurmd"} & running) if conf_accounting != want else []
    changed = write_files(paths, min_job_age=min_job_age, accounting=want)
    if changed and not running:
        report(f"cluster: wrote {', '.join(changed)} in {paths.root}")
    info = dataclasses.replace(cluster_info(paths), accounting=want)
    env = {**info.env(), "PATH": f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}"}
    to_start = [daemon for daemon in _daemons(want) if daemon not in running]
    _check_ports(to_start)
    started: list[str] = []

    def start(daemon: str) -> None:
        if daemon == "mariadbd":
            embedded_accounting.initialise_datadir(paths, report)
        if daemon == "slurmdbd":
            embedded_accounting.prepare_database(paths, timeout=min(timeout, 20))
        pid = _start(paths, daemon, info.node, env, timeout=min(timeout, 20))
        started.append(daemon)
        report(f"cluster: started {daemon} (pid {pid})")

    try:
        for daemon in to_start:
            if daemon in ("munged", *ACCOUNTING_DAEMONS):
                start(daemon)
        if want:
            embedded_accounting.register_cluster(paths, env, min(timeout, 30), report)
        if switch:
            report(f"cluster: turning accounting {'on' if want else 'off'}: restarting {' and '.join(switch)} "
                   "(queued and running jobs are kept)")
            _stop_all(paths, switch, timeout=20, report=report)
        else:
            _apply_changes(paths, info, [name for name in changed if name != "slurmdbd.conf" or "slurmdbd" in running],
                           report, reconfigure="slurmctld" in running)
        for daemon in _daemons(want):
            if daemon not in started and daemon_pid(paths, daemon) is None:
                start(daemon)
        _wait_for_node(info, paths, timeout)
        if not _wait(lambda: _ssh_works(info), timeout, interval=0.5):
            raise SnowpipeError(f"sshd runs but `{' '.join(info.ssh_command('true'))}` fails: "
                                f"read {paths.log('sshd')}{_log_tail(paths.log('sshd'))}")
    except BaseException:  # a half-started cluster helps nobody: stop what this call started, keep the logs
        _stop_all(paths, started, timeout=10, report=report)
        if conf_accounting != want:  # a running slurmctld/slurmd goes on as before (best effort)
            write_files(paths, min_job_age=min_job_age, accounting=conf_accounting)
            for daemon in switch:
                try:
                    _start(paths, daemon, info.node, {**env, "SLURM_CONF": str(paths.slurm_conf)}, timeout=20)
                except SnowpipeError:
                    pass
        raise
    if not want:
        _stop_all(paths, list(ACCOUNTING_DAEMONS), timeout=20, report=report)
    paths.accounting_choice.write_text("on\n" if want else "off\n")
    if not started and not switch and (want or not running & set(ACCOUNTING_DAEMONS)):
        report(f"cluster: already running ({paths.root}); {accounting_line(want)}")
    else:
        report(f"cluster: up: node {info.node} ready, ssh {info.user}@{info.host} -p {info.port}; "
               f"{accounting_line(want)}")
    return info


def _stop(paths: ClusterPaths, daemon: str, pid: int, timeout: float) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; slurmctld needs a moment to save its state."""
    def gone() -> bool:
        return daemon_pid(paths, daemon) != pid

    try:
        os.kill(pid, signal.SIGTERM)
        if not _wait(gone, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait(gone, 5)
    except ProcessLookupError:
        pass


def _stop_all(paths: ClusterPaths, daemons: list[str], *, timeout: float, report: Report) -> list[str]:
    stopped = []
    for daemon in reversed(daemons):
        pid = daemon_pid(paths, daemon)
        if pid is not None:
            _stop(paths, daemon, pid, timeout)
            stopped.append(daemon)
            report(f"cluster: stopped {daemon} (pid {pid})")
        paths.pid(daemon).unlink(missing_ok=True)
    return stopped


def down(*, timeout: float = 20.0, paths: ClusterPaths | None = None, report: Report = say) -> list[str]:
    """Stop the daemons this cluster started (by pid file, reverse order); keys, config, job state and the
    accounting database stay, and so does the accounting choice."""
    paths = paths or ClusterPaths.default()
    stopped = _stop_all(paths, list(ALL_DAEMONS), timeout=timeout, report=report)
    if not stopped:
        report(f"cluster: nothing running ({paths.root})")
    return stopped


def status(paths: ClusterPaths | None = None) -> ClusterStatus:
    """Per daemon its pid (or None), and the node state when slurmctld answers."""
    paths = paths or ClusterPaths.default()
    info = cluster_info(paths)
    pids = {daemon: daemon_pid(paths, daemon) for daemon in ALL_DAEMONS}
    pids = {daemon: pid for daemon, pid in pids.items()
            if pid or info.accounting or daemon not in ACCOUNTING_DAEMONS}
    node_state = _node_state(info) if pids["slurmctld"] and pids["munged"] and paths.slurm_conf.exists() else None
    return ClusterStatus(info=info, pids=pids, node_state=node_state)
