"""One SSH connection to the cluster's login node per command (paramiko), host keys always checked.

Connection facts come from the run record, where Ansible wrote them as it resolved the inventory at
submission: address, port, user, key, known_hosts; the options built from them are those of
pipeline/ssh_options.py. Every failure is one line naming the host and the fix.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.ssh_options import SshOptions


class ConnectionFailed(SnowpipeError):
    """The cluster cannot be reached, refuses us, or presents an unexpected host key."""


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


class ClusterConnection:
    """Commands on the cluster as argv lists (each value shell-quoted), over one connection."""

    def __init__(self, record: RunRecord) -> None:
        self.host = record.host
        self.address = record.login_address
        self.options = ssh_options(record)
        self.port = self.options.port
        self.user = record.user or None
        self.key = self.options.key
        self.known_hosts = self.options.known_hosts
        self.client = self._connect()

    def _where(self) -> str:
        return f"{self.host} ({self.user + '@' if self.user else ''}{self.address}:{self.port})"

    def _connect(self) -> paramiko.SSHClient:
        try:
            return self.options.connect_paramiko(self.address, self.user)
        except paramiko.BadHostKeyException as exc:
            raise ConnectionFailed(
                f"the host key of {self._where()} has CHANGED ({exc.key.get_name()} "
                f"{exc.key.fingerprint}); refusing to connect. Ask the cluster's admins for the new key's "
                f"fingerprint; once verified, replace the old line: ssh-keygen -R '[{self.address}]:{self.port}' "
                f"-f {self.known_hosts}") from None
        except paramiko.AuthenticationException:
            raise ConnectionFailed(
                f"authentication to {self._where()} failed (key {self.key or 'from ssh-agent / ~/.ssh'}): check "
                f"ansible_user and ansible_ssh_private_key_file in the inventory, then submit again") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise ConnectionFailed(
                    f"the host key of {self._where()} is not in {self.known_hosts}: log in once with ssh, compare "
                    f"the fingerprint with the one the cluster documents, and accept it") from None
            raise ConnectionFailed(f"SSH to {self._where()} failed: {exc}") from None
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot reach {self._where()}: {exc.strerror or exc}. For the local cluster run `snowpipe "
                f"cluster up`; otherwise check the network (VPN?) and the host in the inventory") from None

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        _, stdout, stderr = self.client.exec_command(shlex.join(argv), timeout=timeout)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return Result(stdout.channel.recv_exit_status(), out, err)

    def stream(self, argv: list[str], write: Callable[[str], object]) -> int:
        """Run a long command (tail -f), passing its output on as it comes; Ctrl-C stops it."""
        transport = self.client.get_transport()
        if transport is None:
            raise ConnectionFailed(f"the connection to {self._where()} was closed")
        channel = transport.open_session()
        channel.exec_command(shlex.join(argv))
        try:
            while True:
                if channel.recv_ready():
                    write(channel.recv(65536).decode(errors="replace"))
                elif channel.exit_status_ready() and not channel.recv_ready():
                    return channel.recv_exit_status()
                else:
                    channel.status_event.wait(0.2)
        finally:
            channel.close()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ClusterConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ssh_options(record: RunRecord) -> SshOptions:
    """The options of a run record's connection ("" key: ssh's default keys; "" known_hosts: ~/.ssh/known_hosts)."""
    return SshOptions.of(record.port, record.key, record.known_hosts)


def rsync_shell(record: RunRecord) -> str:
    """The `rsync -e` command: the same options as the SSH tools' connections."""
    return ssh_options(record).rsh()
