"""The embedded cluster's files: the packages it needs, where its files live, what they say, and writing them.

Kept apart from the process handling in `embedded.py`: the render functions are pure, so the slurm.conf /
gres.conf / sshd_config text can be read and tested without starting anything.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pipeline
from pipeline.errors import SnowpipeError
from pipeline.progress import say

HOST = "127.0.0.1"
SSH_PORT = 2222
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
SLURMDBD_PORT = 6819
MARIADB_PORT = 3307  # not 3306: a MariaDB/MySQL of the machine's own may listen there
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
PARTITION = "local"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = {  # Debian package -> a program it installs
    "slurmctld": "slurmctld", "slurmd": "slurmd", "slurm-client": "sbatch", "munge": "munged",
    "openssh-server": "sshd", "rsync": "rsync",
}
ACCOUNTING_PACKAGES = {"slurmdbd": "slurmdbd", "mariadb-server": "mariadbd"}  # not for `up --no-accounting`
CLUSTER_NAME = "snowpipe-local"
GPUS = 2
BANNER = ("# rendered by snowpipe (pipeline/localcluster/embedded_files.py) — do not edit; "
          "`snowpipe cluster up` rewrites it")


def cluster_dir() -> Path:
    """`$SNOWPIPE_CLUSTER_DIR`, else `<repo root>/.cluster` (git-ignored), so every checkout has its own cluster."""
    override = os.environ.get("SNOWPIPE_CLUSTER_DIR")
    if override:
        return Path(override).expanduser().resolve()
    return Path(pipeline.__file__).resolve().parent.parent / ".cluster"


@dataclass(frozen=True)
class ClusterPaths:
    """Every file and folder of one embedded cluster, all absolute (daemons run with another working folder)."""

    root: Path

    @classmethod
    def default(cls) -> ClusterPaths:
        return cls(cluster_dir())

    # config
    @property
    def slurm_conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def gres_conf(self) -> Path:
        return self.root / "gres.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        """Next to slurm.conf: slurmdbd has no -f and reads slurmdbd.conf from $SLURM_CONF's folder."""
        return self.root / "slurmdbd.conf"

    @property
    def accounting_choice(self) -> Path:
        """`on` or `off`: whether `up` without --accounting/--no-accounting starts slurmdbd + MariaDB."""
        return self.root / "accounting"

    # MariaDB (accounting only)
    @property
    def mysql_dir(self) -> Path:
        return self.root / "mysql"

    @property
    def mysql_datadir(self) -> Path:
        return self.mysql_dir / "data"

    @property
    def mysql_socket(self) -> Path:
        return self.mysql_dir / "mysqld.sock"

    # munge
    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket.2"

    @property
    def munge_seed(self) -> Path:
        return self.munge_dir / "munged.seed"

    # state, logs, pids
    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def ctld_state(self) -> Path:
        return self.state_dir / "slurmctld"

    @property
    def slurmd_spool(self) -> Path:
        return self.state_dir / "slurmd"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def pid_dir(self) -> Path:
        return self.root / "pids"

    def log(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"

    def pid(self, daemon: str) -> Path:
        return self.pid_dir / f"{daemon}.pid"

    # ssh
    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def sshd_config(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key"

    @property
    def user_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    # fake GPUs and the remote root
    @property
    def dev_dir(self) -> Path:
        return self.root / "dev"

    def gpu(self, index: int) -> Path:
        return self.dev_dir / f"gpu{index}"

    @property
    def remote_root(self) -> Path:
        return self.root / "remote"

    def folders(self) -> list[Path]:
        return [self.root, self.munge_dir, self.ctld_state, self.slurmd_spool, self.log_dir, self.pid_dir,
                self.ssh_dir, self.dev_dir, self.remote_root]


def node_name() -> str:
    """The short host name: slurmctld only accepts a SlurmctldHost that matches it."""
    return os.uname().nodename.split(".")[0]


def real_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal minus 1 GiB of head room; slurmd drains a node that reports less memory than slurm.conf says."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(int(line.split()[1]) // 1024 - 1024, 256)
    return 1024


def render_slurm_conf(paths: ClusterPaths, node: str, cpus: int, memory_mib: int, *, min_job_age: int = 300,
                      accounting: bool = False) -> str:
    """slurm.conf for one node that is also its own controller: no cgroups, munge on our socket.

    `min_job_age` is how many seconds a finished job stays visible to squeue/scontrol (the fallback when sacct is
    unavailable); tests of that fallback lower it. `accounting` sends job records to our slurmdbd (sacct works);
    without it there is no accounting at all.
    """
    if accounting:
        accounting_lines = [
            f"# slurmdbd on {HOST}:{SLURMDBD_PORT} (MariaDB behind it): sacct works",
            "JobAcctGatherType=jobacct_gather/linux",
            "# a sample of each task's memory and CPU every second (SLURM's 30 s misses the demo's short tasks:",
            "# their MaxRSS stayed empty)",
            "JobAcctGatherFrequency=task=1",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "# GPUs in AllocTRES (sacct): what `snowpipe report` turns into GPU-hours",
            "AccountingStorageTRES=gres/gpu",
            f"AccountingStorageHost={HOST}",
            f"AccountingStoragePort={SLURMDBD_PORT}",
            "# for slurmdbd connections the munge socket is AccountingStoragePass (AuthInfo is not used there)",
            f"AccountingStoragePass={paths.munge_socket}",
        ]
    else:
        accounting_lines = [
            "JobAcctGatherType=jobacct_gather/none",
            "# no slurmdbd: sacct is unavailable, status falls back to squeue/scontrol",
            "AccountingStorageType=accounting_storage/none",
        ]
    lines = [
        BANNER,
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={node}({HOST})",
        f"SlurmctldPort={SLURMCTLD_PORT}",
        f"SlurmdPort={SLURMD_PORT}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={paths.munge_socket}",
        f"StateSaveLocation={paths.ctld_state}",
        f"SlurmdSpoolDir={paths.slurmd_spool}",
        f"SlurmctldPidFile={paths.pid('slurmctld')}",
        f"SlurmdPidFile={paths.pid('slurmd')}",
        f"SlurmctldLogFile={paths.log('slurmctld')}",
        f"SlurmdLogFile={paths.log('slurmd')}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "# no cgroups on this machine",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        *accounting_lines,
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "GresTypes=gpu",
        "SchedulerType=sched/backfill",
        "# dependent jobs start within seconds of their parents",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        f"MinJobAge={min_job_age}",
        "ReturnToService=2",
        "# SLURM's default: a job asked to stop (scancel, time limit) has 30 s to save and write its exit marker",
        "# before SIGKILL (5 s lost a training job's exit marker on a loaded machine)",
        "KillWait=30",
        "OverTimeLimit=0",
        "InactiveLimit=0",
        "Waittime=0",
        "SlurmdTimeout=60",
        "SlurmctldTimeout=30",
        f"NodeName={node} NodeAddr={HOST} CPUs={cpus} RealMemory={memory_mib} Gres=gpu:{GPUS} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
    ]
    return "\n".join(lines) + "\n"


def slurm_conf_accounting(text: str) -> bool:
    """Whether a slurm.conf text sends job records to slurmdbd (what a slurmctld started from it does)."""
    return re.search(r"^AccountingStorageType=accounting_storage/slurmdbd\s*$", text, re.MULTILINE) is not None


def render_slurmdbd_conf(paths: ClusterPaths, password: str) -> str:
    """slurmdbd.conf (mode 0600: it holds the database password): our munge socket, MariaDB over 127.0.0.1."""
    lines = [
        BANNER,
        "AuthType=auth/munge",
        f"AuthInfo=socket={paths.munge_socket}",
        "DbdHost=localhost",
        f"DbdAddr={HOST}",
        f"DbdPort={SLURMDBD_PORT}",
        "SlurmUser=root",
        "DebugLevel=info",
        f"LogFile={paths.log('slurmdbd')}",
        f"PidFile={paths.pid('slurmdbd')}",
        "StorageType=accounting_storage/mysql",
        f"StorageHost={HOST}",
        f"StoragePort={MARIADB_PORT}",
        f"StorageUser={DB_USER}",
        f"StoragePass={password}",
        f"StorageLoc={DB_NAME}",
    ]
    return "\n".join(lines) + "\n"


def db_password(paths: ClusterPaths) -> str:
    """The database password in an existing slurmdbd.conf, else a new random one (it is never printed)."""
    try:
        match = re.search(r"^StoragePass=(\S+)$", paths.slurmdbd_conf.read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else secrets.token_urlsafe(24)


def render_gres_conf(paths: ClusterPaths, node: str) -> str:
    """Two GPUs backed by character devices (1,3 = /dev/null): enough for SLURM to schedule `--gres=gpu:N`."""
    return f"{BANNER}\nNodeName={node} Name=gpu File={paths.dev_dir}/gpu[0-{GPUS - 1}]\n"


def render_sshd_config(paths: ClusterPaths) -> str:
    """A private sshd on 127.0.0.1: key login only, and SLURM_CONF set for every remote command (`ssh ... sbatch`)."""
    lines = [
        BANNER,
        f"ListenAddress {HOST}",
        f"Port {SSH_PORT}",
        f"HostKey {paths.host_key}",
        f"PidFile {paths.pid('sshd')}",
        f"AuthorizedKeysFile {paths.authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "PrintMotd no",
        "X11Forwarding no",
        "MaxSessions 32",
        "MaxStartups 32:30:64",
        f"SetEnv SLURM_CONF={paths.slurm_conf}",
        "Subsystem sftp internal-sftp",
    ]
    return "\n".join(lines) + "\n"


def known_hosts_line(host_public_key: str) -> str:
    """`[127.0.0.1]:2222 ssh-ed25519 AAAA...`: what ssh looks up for a host on a non-standard port."""
    key_type, key = host_public_key.split()[:2]
    return f"[{HOST}]:{SSH_PORT} {key_type} {key}\n"


# ---------------------------------------------------------------- packages


def which_program(program: str) -> str | None:
    """Programs in sbin are not on a normal user's PATH; look there too."""
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")


def missing_packages(accounting: bool = False) -> list[str]:
    wanted = {**PACKAGES, **ACCOUNTING_PACKAGES} if accounting else PACKAGES
    return [package for package, program in wanted.items() if which_program(program) is None]


def ensure_packages(report: Callable[[str], None] = say, *, accounting: bool = False) -> None:
    """Install missing Debian packages with apt-get when root; otherwise say exactly what to run.

    Services the packages bring (mariadb) are not started by apt here: the container's policy-rc.d forbids it,
    and without one `invoke-rc.d` finds no runlevel; the cluster runs its own MariaDB from `.cluster/mysql/`.
    """
    missing = missing_packages(accounting)
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or which_program("apt-get") is None:
        raise SnowpipeError(f"the embedded cluster needs the Debian packages {', '.join(missing)}: run "
                            f"`sudo apt-get update && sudo {' '.join(command)}` and retry `snowpipe cluster up`")
    report(f"cluster: installing {', '.join(missing)} with apt-get (once)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], command):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SnowpipeError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {' | '.join(tail)}")
    still = missing_packages(accounting)
    if still:
        raise SnowpipeError(f"apt-get finished but {', '.join(still)} still missing: install them by hand")


# ---------------------------------------------------------------- files


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as out:  # never briefly 0644
        out.write(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def _keygen(key: Path, comment: str) -> None:
    if key.exists() and key.with_name(key.name + ".pub").exists():
        return
    key.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                   check=True, capture_output=True)


def _munge_key(path: Path) -> None:
    if path.exists():
        return
    mungekey = which_program("mungekey")
    if mungekey:
        subprocess.run([mungekey, "--create", f"--keyfile={path}"], check=True, capture_output=True)
    else:
        path.write_bytes(os.urandom(1024))
    path.chmod(0o400)


def _gpu_device(path: Path) -> None:
    """A character device (1,3) per GPU: slurmd rejects GPUs without a file or backed by a regular file."""
    if path.exists() and stat.S_ISCHR(path.stat().st_mode):
        return
    path.unlink(missing_ok=True)
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError as exc:
        raise SnowpipeError(f"cannot create the fake GPU device {path} (mknod c 1 3): {exc}; "
                            "run `snowpipe cluster up` as root") from exc


def write_files(paths: ClusterPaths, *, min_job_age: int = 300, accounting: bool = False) -> list[str]:
    """Create the layout; keys are generated once and kept, config files are rewritten when they differ.

    With `accounting`, also slurmdbd.conf (0600, password generated once and kept); without it an existing
    slurmdbd.conf stays as it is (the password in it is reused when accounting is turned on again).
    """
    for folder in paths.folders():
        folder.mkdir(parents=True, exist_ok=True)
    paths.munge_dir.chmod(0o755)  # clients need to reach the socket; munged refuses a group/world-writable dir
    paths.ssh_dir.chmod(0o700)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privilege separation folder
    _munge_key(paths.munge_key)
    _keygen(paths.host_key, "snowpipe-cluster-host")
    _keygen(paths.user_key, f"snowpipe-cluster-{getpass.getuser()}")
    for index in range(GPUS):
        _gpu_device(paths.gpu(index))
    node = node_name()
    texts = {
        paths.slurm_conf: render_slurm_conf(paths, node, os.cpu_count() or 1, real_memory_mib(),
                                            min_job_age=min_job_age, accounting=accounting),
        paths.gres_conf: render_gres_conf(paths, node),
        paths.sshd_config: render_sshd_config(paths),
        paths.authorized_keys: paths.user_key.with_name("id_ed25519.pub").read_text(),
        paths.known_hosts: known_hosts_line(paths.host_key.with_name(paths.host_key.name + ".pub").read_text()),
    }
    changed = [path.name for path, text in texts.items() if _write_if_changed(path, text)]
    if accounting:
        paths.mysql_dir.mkdir(mode=0o700, exist_ok=True)
        if _write_if_changed(paths.slurmdbd_conf, render_slurmdbd_conf(paths, db_password(paths)), mode=0o600):
            changed.append(paths.slurmdbd_conf.name)
        paths.slurmdbd_conf.chmod(0o600)  # slurmdbd refuses a slurmdbd.conf others can read
    return changed
