"""Accounting for the embedded cluster (`snowpipe cluster up --accounting`): a MariaDB and a slurmdbd of its own.

MariaDB runs from `.cluster/mysql/` (datadir, socket) on 127.0.0.1:3307 with its own pid and log file, never the
machine's MariaDB service; slurmdbd (config `.cluster/slurmdbd.conf`, found through $SLURM_CONF's folder) reaches
it over TCP as user `slurm` with the password generated into slurmdbd.conf. Root administers MariaDB through the
socket (unix_socket authentication), so no root password exists anywhere.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

from pipeline.errors import SnowpipeError
from pipeline.localcluster.embedded_files import (
    CLUSTER_NAME,
    DB_NAME,
    DB_USER,
    HOST,
    MARIADB_PORT,
    ClusterPaths,
    db_password,
    which_program,
)

Report = Callable[[str], None]


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"


def initialise_datadir(paths: ClusterPaths, report: Report) -> None:
    """`mariadb-install-db` once (about a second); a datadir left half-made by a failed run is made again."""
    if (paths.mysql_datadir / "mysql").is_dir():
        return
    program = which_program("mariadb-install-db") or which_program("mysql_install_db")
    if program is None:
        raise SnowpipeError("mariadb-install-db not found: install the Debian package mariadb-server")
    shutil.rmtree(paths.mysql_datadir, ignore_errors=True)
    paths.mysql_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = subprocess.run([program, "--no-defaults", "--user=root", f"--datadir={paths.mysql_datadir}",
                           "--auth-root-authentication-method=socket", "--skip-test-db"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(paths.mysql_datadir, ignore_errors=True)
        raise SnowpipeError(f"`{program}` failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
    report(f"cluster: initialised the accounting database in {paths.mysql_datadir}")


def mariadbd_argv(paths: ClusterPaths) -> list[str]:
    """mariadbd does not fork; `setsid -f` detaches it so that, like the other daemons, the start command returns."""
    program = which_program("mariadbd") or which_program("mysqld") or "mariadbd"
    return ["setsid", "-f", program, "--no-defaults", "--user=root", f"--datadir={paths.mysql_datadir}",
            f"--socket={paths.mysql_socket}", f"--pid-file={paths.pid('mariadbd')}",
            f"--log-error={paths.log('mariadbd')}", f"--bind-address={HOST}", f"--port={MARIADB_PORT}",
            "--skip-name-resolve",
            # slurmdbd's recommendations (it logs "Database settings not recommended values" otherwise), except
            # the buffer pool: slurmdbd still finds 128M small, which is plenty for a one-node cluster
            "--innodb-buffer-pool-size=128M", "--innodb-log-file-size=64M", "--innodb-lock-wait-timeout=900"]


def prepare_database(paths: ClusterPaths, timeout: float = 20.0) -> None:
    """The `slurm` user with slurmdbd.conf's password and all rights on the accounting database (idempotent).

    The SQL goes through stdin, so the password never shows in a process list.
    """
    password = db_password(paths)
    user = f"'{DB_USER}'@'{HOST}'"
    sql = (f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY '{password}';\n"
           f"ALTER USER {user} IDENTIFIED BY '{password}';\n"
           f"GRANT ALL ON {DB_NAME}.* TO {user};\n")
    client = which_program("mariadb") or which_program("mysql") or "mariadb"
    argv = [client, "--no-defaults", f"--socket={paths.mysql_socket}", "--user=root", "--batch"]
    # The socket exists a moment before the server takes connections.
    done = _until_success(lambda: subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=30),
                          timeout)
    if done.returncode != 0:
        raise SnowpipeError(f"cannot create the database user for slurmdbd: {_tail(done.stderr)}; "
                            f"read {paths.log('mariadbd')}")


def _until_success(run: Callable[[], subprocess.CompletedProcess[str]],
                   timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command until it succeeds or `timeout` seconds pass; its last result either way."""
    deadline = time.monotonic() + timeout
    while (done := run()).returncode != 0 and time.monotonic() <= deadline:
        time.sleep(0.3)
    return done


def _sacctmgr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sacctmgr", "--immediate", "--noheader", "--parsable2", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def register_cluster(paths: ClusterPaths, env: dict[str, str], timeout: float, report: Report) -> None:
    """Wait until slurmdbd answers, then add the cluster unless it is known (this also creates the root account
    and root's association). Done before slurmctld starts, so that slurmctld registers with a known cluster."""
    listed = _until_success(lambda: _sacctmgr(env, "list", "cluster", "format=cluster"), timeout)
    if listed.returncode != 0:
        raise SnowpipeError(f"slurmdbd does not answer `sacctmgr list cluster` after {timeout:.0f} s: "
                            f"{_tail(listed.stderr)}; read {paths.log('slurmdbd')}")
    if CLUSTER_NAME in listed.stdout.split():
        return
    added = _sacctmgr(env, "add", "cluster", CLUSTER_NAME)
    if added.returncode != 0:
        raise SnowpipeError(f"`sacctmgr add cluster {CLUSTER_NAME}` failed: {_tail(added.stderr or added.stdout)}")
    report(f"cluster: registered {CLUSTER_NAME} with slurmdbd")
