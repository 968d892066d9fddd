"""The embedded local cluster: this machine as a one-node SLURM cluster reachable over SSH on 127.0.0.1:2222.

Four daemons (munged, slurmctld, slurmd, sshd) run from files under `cluster_dir()`, each with its own pid file,
so `down()` stops exactly what `up()` started and never touches the machine's own services. `up()` is idempotent:
it writes what is missing, keeps existing keys (known_hosts stays valid) and starts only daemons that are not
running.
"""

from __future__ import annotations

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

from pipeline.cluster.embedded_files import (
    HOST,
    PARTITION,
    SLURMCTLD_PORT,
    SLURMD_PORT,
    SSH_PORT,
    SYSTEM_PATH,
    ClusterPaths,
    cluster_dir,
    ensure_packages,
    missing_packages,
    node_name,
    which_program,
    write_files,
)
from pipeline.errors import SnowpipeError
from pipeline.progress import say

__all__ = ["ClusterInfo", "ClusterStatus", "DAEMONS", "cluster_dir", "cluster_info", "down", "is_up",
           "missing_packages", "status", "up", "write_files"]

DAEMONS = ("munged", "slurmctld", "slurmd", "sshd")
"""Start order; `down()` stops them in reverse."""

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

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for running sbatch / squeue / scontrol on this machine."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def ssh_command(self, *remote: str) -> list[str]:
        """`ssh` with this cluster's key and known_hosts, host keys checked, never prompting."""
        return ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "ConnectTimeout=5", f"{self.user}@{self.host}", *remote]


@dataclass
class ClusterStatus:
    """Which daemons run (pid or None) and the node state sinfo reports (None when slurmctld does not answer)."""

    info: ClusterInfo
    pids: dict[str, int | None] = field(default_factory=dict)
    node_state: str | None = None

    @property
    def all_running(self) -> bool:
        return all(pid is not None for pid in self.pids.values())

    @property
    def any_running(self) -> bool:
        return any(pid is not None for pid in self.pids.values())


def cluster_info(paths: ClusterPaths | None = None) -> ClusterInfo:
    """The connection facts; valid whether or not the cluster runs."""
    paths = paths or ClusterPaths.default()
    return ClusterInfo(host=HOST, port=SSH_PORT, user=getpass.getuser(), key=paths.user_key,
                       known_hosts=paths.known_hosts, slurm_conf=paths.slurm_conf, node=node_name(),
                       partition=PARTITION, remote_root=paths.remote_root)


# ---------------------------------------------------------------- processes


def daemon_pid(paths: ClusterPaths, daemon: str) -> int | None:
    """The pid in the daemon's pid file when that process is alive and is ours (its command names our folder)."""
    try:
        pid = int(paths.pid(daemon).read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    if comm != daemon or str(paths.root) not in cmdline:
        return None
    return pid


def is_up(paths: ClusterPaths | None = None) -> bool:
    """True when all four daemons run (what a test fixture checks before deciding whether to stop them later)."""
    paths = paths or ClusterPaths.default()
    return all(daemon_pid(paths, daemon) is not None for daemon in DAEMONS)


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
    return ["/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else program,  # sshd re-exec needs an absolute path
            "-f", str(paths.sshd_config), "-E", str(paths.log("sshd"))]


PORTS = {"slurmctld": ("0.0.0.0", SLURMCTLD_PORT), "slurmd": ("0.0.0.0", SLURMD_PORT), "sshd": (HOST, SSH_PORT)}


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


def _apply_changes(paths: ClusterPaths, info: ClusterInfo, changed: list[str], report: Report) -> None:
    """A running cluster picks up a new slurm.conf (e.g. another MinJobAge) with `scontrol reconfigure`."""
    if "slurm.conf" in changed:
        done = subprocess.run(["scontrol", "reconfigure"], env=info.env(), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise SnowpipeError(f"slurm.conf changed but `scontrol reconfigure` failed: {done.stderr.strip()}; "
                                f"read {paths.log('slurmctld')}")
        report("cluster: slurm.conf changed; slurmctld and slurmd reconfigured")
    others = [name for name in changed if name != "slurm.conf"]
    if others:
        report(f"cluster: {', '.join(others)} changed; `snowpipe cluster down && snowpipe cluster up` applies it")


def up(*, min_job_age: int = 300, timeout: float = 60.0, paths: ClusterPaths | None = None,
       report: Report = say) -> ClusterInfo:
    """Start the cluster (idempotent) and return once the node is ready and ssh with host-key checking works."""
    paths = paths or ClusterPaths.default()
    info = cluster_info(paths)
    if is_up(paths):
        if os.geteuid() == 0:
            _apply_changes(paths, info, write_files(paths, min_job_age=min_job_age), report)
        report(f"cluster: already running ({paths.root})")
        return info
    ensure_packages(report)
    if os.geteuid() != 0:
        raise SnowpipeError("the embedded cluster runs munged, slurmctld and slurmd as root (SlurmUser=root) and "
                            "creates device nodes: run `snowpipe cluster up` as root")
    changed = write_files(paths, min_job_age=min_job_age)
    if changed:
        report(f"cluster: wrote {', '.join(changed)} in {paths.root}")
    env = {**info.env(), "PATH": f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}"}
    to_start = [daemon for daemon in DAEMONS if daemon_pid(paths, daemon) is None]
    _check_ports(to_start)
    started: list[str] = []
    try:
        for daemon in to_start:
            pid = _start(paths, daemon, info.node, env, timeout=min(timeout, 20))
            started.append(daemon)
            report(f"cluster: started {daemon} (pid {pid})")
        _wait_for_node(info, paths, timeout)
        if not _wait(lambda: _ssh_works(info), timeout, interval=0.5):
            raise SnowpipeError(f"sshd runs but `{' '.join(info.ssh_command('true'))}` fails: "
                                f"read {paths.log('sshd')}{_log_tail(paths.log('sshd'))}")
    except BaseException:  # a half-started cluster helps nobody: stop what this call started, keep the logs
        _stop_all(paths, started, timeout=10, report=report)
        raise
    report(f"cluster: up: node {info.node} ready, ssh {info.user}@{info.host} -p {info.port}")
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
    """Stop the daemons this cluster started (by pid file, reverse order); keys, config and state stay."""
    paths = paths or ClusterPaths.default()
    stopped = _stop_all(paths, list(DAEMONS), timeout=timeout, report=report)
    if not stopped:
        report(f"cluster: nothing running ({paths.root})")
    return stopped


def status(paths: ClusterPaths | None = None) -> ClusterStatus:
    """Per daemon its pid (or None), and the node state when slurmctld answers."""
    paths = paths or ClusterPaths.default()
    info = cluster_info(paths)
    pids = {daemon: daemon_pid(paths, daemon) for daemon in DAEMONS}
    node_state = _node_state(info) if pids["slurmctld"] and pids["munged"] and paths.slurm_conf.exists() else None
    return ClusterStatus(info=info, pids=pids, node_state=node_state)
