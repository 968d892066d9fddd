"""rsync over SSH to a data server: list a folder, transfer with filters, explain failures in one line.

Every call is an argv list (never a shell); ssh's options come from pipeline/ssh_options.py: host keys always
checked (StrictHostKeyChecking=yes against the configured known_hosts file), never prompting (BatchMode=yes), so a
missing key fails instead of hanging.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError, SnowpipeError
from pipeline.ssh_options import SshOptions, login

IO_TIMEOUT_S = 300  # rsync gives up when no data moves for this long
PARTIAL_DIR = ".rsync-partial"  # half-transferred files wait here, so none looks complete under its real name
SSH_AUTH_FAILED = re.compile(r"Permission denied \((publickey|password|keyboard|gssapi|hostbased)")
UNREACHABLE = ("Connection refused", "Could not resolve hostname", "timed out", "No route to host",
               "Network is unreachable", "Connection reset", "Connection closed by", "kex_exchange_identification")


@dataclass(frozen=True)
class DataServer:
    """A folder on a data server and how to reach it (download.host, user, port, key, known_hosts)."""

    host: str
    path: str
    port: int = 22
    user: str = ""
    key: Path | None = None
    known_hosts: Path | None = None

    @property
    def login(self) -> str:
        return login(self.host, self.user)

    @property
    def where(self) -> str:
        """For messages: user@host:path (port N)."""
        return f"{self.login}:{self.path} (port {self.port})"

    @property
    def source(self) -> str:
        """The folder's contents as an rsync source (trailing slash: the contents, not the folder itself)."""
        return f"{self.login}:{self.path.rstrip('/')}/"

    @property
    def ssh(self) -> SshOptions:
        """No known_hosts: ~/.ssh/known_hosts."""
        return SshOptions.of(self.port, self.key, self.known_hosts)

    def ssh_argv(self) -> list[str]:
        return self.ssh.argv()

    def rsh(self) -> str:
        """The `-e` value: rsync splits it on spaces and honours quotes, so paths with spaces survive."""
        return self.ssh.rsh()


@dataclass(frozen=True)
class Entry:
    """One line of `rsync --list-only`: a path relative to the listed folder, its size, its kind."""

    path: str
    size: int
    kind: str  # "file", "dir" or "other" (links, devices)


def parse_listing(text: str) -> list[Entry]:
    """`-rw-r--r--  12345 2024/01/31 12:00:00 name` lines (sizes without digit grouping: --no-human-readable)."""
    entries = []
    for line in text.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 5 or not parts[1].isdigit() or parts[4] == ".":
            continue
        kind = {"-": "file", "d": "dir"}.get(parts[0][0], "other")
        name = parts[4].split(" -> ")[0] if kind == "other" else parts[4]
        entries.append(Entry(name, int(parts[1]), kind))
    return entries


def explain(remote: DataServer, stderr: str, code: int, what: str) -> SnowpipeError:
    """One line naming what failed, the config key involved and the fix."""
    port = f"-p {remote.port} " if remote.port != 22 else ""
    known = remote.known_hosts or "~/.ssh/known_hosts"
    if "Host key verification failed" in stderr or "IDENTIFICATION HAS CHANGED" in stderr:
        return SnowpipeError(
            f"download: the host key of {remote.host} port {remote.port} is not in {known} (download.known_hosts) "
            f"or does not match it: check the server's key fingerprint with its administrator, then connect "
            f"once with `ssh {port}{remote.login}` and accept it (host keys are always checked)")
    if SSH_AUTH_FAILED.search(stderr):
        key = f"key {remote.key}" if remote.key else "ssh's default keys"
        return SnowpipeError(
            f"download: {remote.host} refused the login of {remote.user or 'the local user'} with {key} "
            f"(download.user, download.key): install the public key on the server, e.g. "
            f"`ssh-copy-id {'-i ' + str(remote.key) + ' ' if remote.key else ''}{port}{remote.login}`")
    said = [line.strip() for line in stderr.splitlines() if any(marker in line for marker in UNREACHABLE)]
    if said:
        return SnowpipeError(
            f"download: cannot reach {remote.host} port {remote.port} (download.host, download.port): "
            f"{said[0]}; check the host name, the port and your network or VPN")
    if "No such file or directory" in stderr and ("change_dir" in stderr or "link_stat" in stderr):
        return DataError(
            f"download.remote_path: folder {remote.path} does not exist on {remote.host}: fix download.remote_path "
            f"(list the server with `ssh {port}{remote.login} ls`)")
    if code == 127 or "command not found" in stderr:
        return SnowpipeError(f"download: rsync is not installed on {remote.host} (it must run on both ends): "
                             f"ask its administrator to install rsync")
    return SnowpipeError(f"download: {what} from {remote.where} failed (rsync exit {code}): "
                         f"{_last_line(stderr) or 'no message'}; run the download again (it resumes)")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("rsync error")]
    return lines[-1] if lines else ""


def _rsync(remote: DataServer, args: list[str]) -> list[str]:
    return ["rsync", "--no-human-readable", f"--timeout={IO_TIMEOUT_S}", "-e", remote.rsh(), *args]


def _not_installed() -> SnowpipeError:
    return SnowpipeError("download: rsync or ssh is not installed on this machine: install them "
                         "(apt install rsync openssh-client, or brew install rsync)")


def list_remote(remote: DataServer, filters: list[str] | None = None, recursive: bool = False) -> list[Entry]:
    """The server folder's entries (its top level, or everything the filters select with `recursive`)."""
    argv = _rsync(remote, ["--list-only", *(["--recursive"] if recursive else []), *(filters or []), remote.source])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise _not_installed() from None
    if done.returncode != 0:
        raise explain(remote, done.stderr, done.returncode, "listing the folder")
    return parse_listing(done.stdout)


def transfer(remote: DataServer, dest: Path, filters: list[str],
             on_item: Callable[[str], None] | None = None) -> list[str]:
    """rsync the selected entries into `dest`; returns rsync's itemised changes (`>f+++++++++ path` per file).

    --partial keeps what arrived of an interrupted file (in PARTIAL_DIR), so a rerun resumes it; files that
    are already complete (same size and time) are not sent again. Nothing local is ever deleted.
    """
    dest.mkdir(parents=True, exist_ok=True)
    argv = _rsync(remote, ["--archive", "--partial", f"--partial-dir={PARTIAL_DIR}", "--itemize-changes",
                           *filters, remote.source, f"{dest}/"])
    items: list[str] = []
    with tempfile.TemporaryFile(mode="w+t") as errors:
        try:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
        except FileNotFoundError:
            raise _not_installed() from None
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if len(line) > 12 and line[11] == " ":
                items.append(line)
                if on_item is not None:
                    on_item(line[12:])
        code = process.wait()
        errors.seek(0)
        stderr = errors.read()
    if code != 0:
        raise explain(remote, stderr, code, "the transfer")
    return items


def received_files(items: list[str]) -> list[str]:
    """Paths of the files rsync actually sent (itemised `>f...`), not directories or attribute updates."""
    return [item[12:] for item in items if item.startswith(">f")]
