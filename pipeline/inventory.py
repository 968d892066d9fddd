"""The Ansible inventory as snowpipe's commands read it: a host of group `cluster` and its variables, templated as
Ansible templates them for a play. `snowpipe plan` reads the snowpipe_* variables, `snowpipe probe` the
connection (ansible_host, ansible_port, ansible_user, the key, snowpipe_known_hosts).

Ansible is imported in a child process (`python -m pipeline.inventory`), never in the caller's: importing
ansible-core >= 2.19 replaces process globals (`sys.intern` becomes a patch object), which breaks a later
`import torch._dynamo` in the same process, and its plugin loader is set up once per process."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DEFAULT_INVENTORY = Path(__file__).resolve().parent.parent / "inventory" / "local.yml"
CLUSTER_GROUP = "cluster"


def inventory_host_vars(inventory: Path, host: str | None = None,
                        keys: tuple[str, ...] = ("snowpipe_",)) -> tuple[str, dict[str, Any]]:
    """The first host of group `cluster` (or `host`) and its variables whose names start with `keys`, templated
    as Ansible templates them for a play (group_vars included; `{{ inventory_dir }}` and lookups resolved)."""
    if not inventory.is_file():
        raise ConfigError(f"inventory {inventory} not found: pass -i inventory/local.yml or your cluster's file")
    argv = [sys.executable, "-m", "pipeline.inventory", str(inventory), host or "", *keys]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"inventory {inventory} could not be read by Ansible: {detail}") from None
    sys.stderr.write(done.stderr)  # Ansible's own warnings, e.g. "Unable to parse ... as an inventory source"
    if "error" in answer:
        raise ConfigError(answer["error"])
    return answer["host"], answer["vars"]


def _read_in_this_process(inventory: Path, host: str | None, keys: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """What the child process does: Ansible's own inventory manager, variable manager and templar."""
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    try:  # lookups (`ansible.builtin.pipe` in inventory/local.yml) need the collection loader
        from ansible.plugins.loader import init_plugin_loader
    except ImportError:  # ansible-core before 2.15 sets it up on import
        pass
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            init_plugin_loader()

    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(inventory)])
    hosts = manager.get_groups_dict().get(CLUSTER_GROUP, [])
    host = host or (hosts[0] if hosts else None)
    if host is None or manager.get_host(host) is None:
        raise ConfigError(f"inventory {inventory} has no host {host or f'in group `{CLUSTER_GROUP}`'}")
    variables = VariableManager(loader=loader, inventory=manager).get_vars(host=manager.get_host(host))
    templar = Templar(loader=loader, variables=variables)
    try:
        return host, {key: templar.template(value) for key, value in variables.items() if key.startswith(keys)}
    except AnsibleError as exc:
        raise ConfigError(f"inventory {inventory}, host {host}: {exc.message}") from None


def _main(argv: list[str]) -> int:
    inventory, host, *keys = argv
    try:
        name, found = _read_in_this_process(Path(inventory), host or None, tuple(keys))
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
    else:  # a value JSON has no type for (a date from a YAML inventory) goes as its text
        print(json.dumps({"host": name, "vars": found}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
