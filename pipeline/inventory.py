"""The Ansible inventory as snowpipe's commands read it: a host of group `cluster` and its variables, templated as
Ansible templates them for a play. `snowpipe plan` reads the snowpipe_* variables, `snowpipe probe` the
connection (ansible_host, ansible_port, ansible_user, the key, snowpipe_known_hosts)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DEFAULT_INVENTORY = Path(__file__).resolve().parent.parent / "inventory" / "local.yml"
CLUSTER_GROUP = "cluster"
_loader_ready: list[bool] = []


def inventory_host_vars(inventory: Path, host: str | None = None,
                        keys: tuple[str, ...] = ("snowpipe_",)) -> tuple[str, dict[str, Any]]:
    """The first host of group `cluster` (or `host`) and its snowpipe_* variables (those starting with `keys`),
    templated as Ansible templates them for a play (group_vars included; `{{ inventory_dir }}` and lookups
    resolved)."""
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    if not _loader_ready:  # lookups (`ansible.builtin.pipe` in inventory/local.yml) need the collection loader
        try:               # that ansible's own commands set up, once per process
            from ansible.plugins.loader import init_plugin_loader
        except ImportError:  # ansible-core before 2.15 sets it up on import
            pass
        else:
            with warnings.catch_warnings():  # "already configured" where something else set it up first
                warnings.simplefilter("ignore", UserWarning)
                init_plugin_loader()
        _loader_ready.append(True)

    if not inventory.is_file():
        raise ConfigError(f"inventory {inventory} not found: pass -i inventory/local.yml or your cluster's file")
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
