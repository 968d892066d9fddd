"""The SSH options of every connection snowpipe opens, written once.

Used by rsync's ssh (the download stage, `snowpipe fetch`), plain ssh (the embedded cluster) and paramiko
(`snowpipe status / logs / cancel`). Host keys are always checked against one known_hosts file
(StrictHostKeyChecking=yes; paramiko: that file and RejectPolicy), nothing ever prompts (BatchMode=yes), and a
configured key is the only one offered (IdentitiesOnly=yes; paramiko: no agent, no ~/.ssh keys). Without a key,
ssh's default keys and agent are used, by ssh and paramiko alike.

Ansible cannot import this module: the inventories' `ansible_ssh_common_args` and the stage_data role's
`stage_data_rsh` write the same options in Jinja, and tests/test_ssh_options.py checks them against these
(Ansible's connections through its own ssh connection plugin).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko

CONNECT_TIMEOUT_S = 10  # also Ansible's ssh connection default (`timeout`), so its connections match
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def login(host: str, user: str = "") -> str:
    """ssh's destination: user@host, or the host alone (ssh's default user)."""
    return f"{user}@{host}" if user else host


@dataclass(frozen=True)
class SshOptions:
    """How every connection is opened (not where to): the port, the key and the known_hosts file; the rest is fixed.

    Build it with `of()` from settings as configs and run records hold them.
    """

    port: int
    key: Path | None
    known_hosts: Path

    @classmethod
    def of(cls, port: int | str = 22, key: str | Path | None = None,
           known_hosts: str | Path | None = None) -> SshOptions:
        """No key ("" or None): ssh's default keys and agent; no known_hosts: ~/.ssh/known_hosts; `~` expanded."""
        return cls(port=int(port), key=Path(key).expanduser() if key else None,
                   known_hosts=Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser())

    def argv(self) -> list[str]:
        """`ssh` with every option; append the destination (`login()`) and the remote command."""
        key = ["-i", str(self.key), "-o", "IdentitiesOnly=yes"] if self.key is not None else []
        # ssh splits an -o value on spaces (UserKnownHostsFile takes several files): quoted, the path stays whole
        return ["ssh", "-p", str(self.port), *key, "-o", f'UserKnownHostsFile="{self.known_hosts}"',
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]

    def command(self, destination: str, *remote: str) -> list[str]:
        """ssh to `destination` (user@host) running `remote` (joined by the remote shell: quote its values)."""
        return [*self.argv(), destination, *remote]

    def rsh(self) -> str:
        """rsync's `-e` / `--rsh` value: rsync splits it as a shell would, so every value stays whole."""
        return shlex.join(self.argv())

    def connect_paramiko(self, address: str, user: str | None) -> paramiko.SSHClient:
        """A paramiko client connected with the settings of `argv()`; paramiko's exceptions pass through."""
        import paramiko

        client = paramiko.SSHClient()
        if self.known_hosts.is_file():  # no file: every host key is unknown, and RejectPolicy refuses it
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())  # StrictHostKeyChecking=yes
        only_key = self.key is not None  # IdentitiesOnly=yes
        try:
            client.connect(address, port=self.port, username=user or None,
                           key_filename=str(self.key) if only_key else None,
                           allow_agent=not only_key, look_for_keys=not only_key, timeout=CONNECT_TIMEOUT_S,
                           banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S)
        except BaseException:
            client.close()
            raise
        return client
