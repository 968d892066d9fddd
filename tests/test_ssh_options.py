"""One set of SSH options everywhere: pipeline/ssh_options.py, and the Ansible inventories and stage_data role that
restate it in Jinja (Ansible cannot import Python). Nothing here connects to anything."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import paramiko
import pytest

from pipeline.contract.run_record import Connection, RunRecord
from pipeline.localcluster.embedded import cluster_info
from pipeline.localcluster.embedded_files import ClusterPaths
from pipeline.monitor.ssh import ClusterConnection, rsync_shell, ssh_options
from pipeline.ssh_options import CONNECT_TIMEOUT_S, SshOptions, login
from pipeline.stages import rsync

REPO_ROOT = Path(__file__).resolve().parent.parent

# What Ansible's ssh connection sets for itself, beyond our options: connection sharing, the user (not an option
# of ours: the destination's), compression, and no password prompts.
ANSIBLE_OWN = {"-C", "controlmaster", "controlpersist", "controlpath", "kbdinteractiveauthentication",
               "preferredauthentications", "passwordauthentication", "numberofpasswordprompts", "user"}


def read_ssh(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """What ssh makes of an argv's options: each (lower case) with its FIRST value, an `-o` value split as ssh
    splits it (on spaces, double quotes keeping a path whole); IdentityFile adds up; flags map to ()."""
    options: dict[str, tuple[str, ...]] = {}
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith("-"):
            break  # the destination
        if arg in ("-p", "-i"):
            name, words = {"-p": "Port", "-i": "IdentityFile"}[arg], (next(args),)
        elif arg == "-o":
            name, value = re.split(r"[=\s]", next(args), maxsplit=1)
            words = tuple(shlex.split(value))
        else:
            options.setdefault(arg, ())
            continue
        if name.lower() == "identityfile":
            options["identityfile"] = options.get("identityfile", ()) + words
        else:
            options.setdefault(name.lower(), words)
    return options


# ------------------------------------------------------------------ the builder


def test_a_key_is_the_only_one_offered_and_host_keys_are_always_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    plain = SshOptions.of()
    assert plain == SshOptions(22, None, tmp_path / ".ssh" / "known_hosts")
    assert plain.argv() == ["ssh", "-p", "22", "-o", f'UserKnownHostsFile="{tmp_path}/.ssh/known_hosts"',
                            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    keyed = SshOptions.of("2222", "~/id", "~/kh")
    assert keyed.argv()[:7] == ["ssh", "-p", "2222", "-i", f"{tmp_path}/id", "-o", "IdentitiesOnly=yes"]
    assert keyed.command(login("h", "me"), "true")[-2:] == ["me@h", "true"] and login("h") == "h"


def test_paths_with_spaces_stay_whole_for_rsync_and_for_ssh(tmp_path):
    options = SshOptions.of(22, tmp_path / "my keys" / "id", tmp_path / "ssh dir" / "known hosts")
    assert shlex.split(options.rsh()) == options.argv()  # rsync splits --rsh like a shell
    seen = read_ssh(options.argv())
    assert seen["identityfile"] == (str(options.key),)
    assert seen["userknownhostsfile"] == (str(options.known_hosts),)  # one file, not three


def test_the_download_stage_uses_the_builder(tmp_path):
    remote = rsync.DataServer(host="data.example.org", path="/data", port=2200, user="me", key=tmp_path / "id",
                              known_hosts=tmp_path / "kh")
    options = SshOptions.of(2200, tmp_path / "id", tmp_path / "kh")
    assert remote.ssh_argv() == options.argv() and remote.rsh() == options.rsh()
    argv = rsync._rsync(remote, ["--list-only", remote.source])
    assert argv[argv.index("-e") + 1] == options.rsh() and remote.login == "me@data.example.org"


def test_the_ssh_tools_connect_with_the_same_settings_in_paramiko(tmp_path, monkeypatch):
    """StrictHostKeyChecking=yes: the known_hosts file and RejectPolicy; IdentitiesOnly=yes: neither the agent
    nor ~/.ssh; BatchMode=yes: paramiko never prompts; ConnectTimeout: every timeout."""
    host_key = paramiko.RSAKey.generate(1024)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:2200 ssh-rsa {host_key.get_base64()}\n")
    calls: list[tuple[paramiko.SSHClient, str, dict[str, Any]]] = []
    monkeypatch.setattr(paramiko.SSHClient, "connect",
                        lambda client, address, **kw: calls.append((client, address, kw)))
    record = RunRecord(run_id="r", remote_dir="/r", host="c", address="127.0.0.1", port=2200, user="me",
                       key=str(tmp_path / "id"), known_hosts=str(known))
    with ClusterConnection(record), ClusterConnection(record.model_copy(update={"key": ""})):
        pass
    (keyed, address, with_key), (_, _, without_key) = calls
    assert address == "127.0.0.1" and isinstance(keyed._policy, paramiko.RejectPolicy)
    assert keyed.get_host_keys().lookup("[127.0.0.1]:2200")["ssh-rsa"] == host_key
    timeouts = dict.fromkeys(["timeout", "banner_timeout", "auth_timeout"], CONNECT_TIMEOUT_S)
    assert with_key == {"port": 2200, "username": "me", "key_filename": str(tmp_path / "id"), "allow_agent": False,
                        "look_for_keys": False, **timeouts}
    assert without_key | {"key_filename": None} == without_key
    assert (without_key["allow_agent"], without_key["look_for_keys"]) == (True, True)


# ------------------------------------------------------------------ Ansible says the same


def _load(loader, path: Path) -> Any:
    try:  # ansible-core >= 2.19 renders only templates from trusted files
        return loader.load_from_file(str(path), trusted_as_template=True)
    except TypeError:
        return loader.load_from_file(str(path))


@pytest.fixture(scope="module")
def ansible_view():
    """What a submission with an inventory (and `-e` values) connects with: Ansible's own ssh command line, built
    by its ssh connection plugin as for the tasks on the cluster; the stage_data role's rsync --rsh; and the
    connection the record role writes for `snowpipe status / logs / fetch / cancel`."""
    unpatched_intern = sys.intern  # ansible-core >= 2.19 patches it on import; torch._dynamo (later tests) needs it

    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.playbook.play_context import PlayContext
    from ansible.plugins.loader import connection_loader, init_plugin_loader
    from ansible.template import Templar
    from ansible.utils.collection_loader import AnsibleCollectionConfig
    from ansible.vars.manager import VariableManager

    if not AnsibleCollectionConfig.collection_finder:
        init_plugin_loader([])  # as ansible-playbook does: lookups (local.yml's `id -un`) need it
    loader = DataLoader()
    roles = REPO_ROOT / "ansible" / "roles"
    rsh = _load(loader, roles / "stage_data" / "defaults" / "main.yml")["stage_data_rsh"]
    connection = _load(loader, roles / "record" / "tasks" / "main.yml")[0]["vars"]["record_input"]["connection"]

    def view(inventory: str, extra_vars: dict[str, Any], control_dir: Path) -> tuple[list[str], str, RunRecord]:
        manager = InventoryManager(loader=loader, sources=[str(REPO_ROOT / "inventory" / inventory)])
        host = manager.get_host(manager.get_groups_dict()["cluster"][0])
        variables = {**VariableManager(loader=loader, inventory=manager).get_vars(host=host), **extra_vars,
                     "ansible_control_path_dir": str(control_dir)}
        templar = Templar(loader=loader, variables=variables)
        ssh = connection_loader.get("ssh", PlayContext())
        ssh.set_options(var_options={key: templar.template(value) for key, value in variables.items()
                                     if key.startswith("ansible_")})
        argv = [arg.decode() for arg in ssh._build_command("ssh", "ssh", host.name, "true")]
        written = Connection.model_validate(templar.template(connection))  # as the record role pipes it in
        record = RunRecord(run_id="r", remote_dir="/r", **written.model_dump())
        return argv, templar.template(rsh), record

    yield view
    sys.intern = unpatched_intern


@pytest.mark.parametrize(("inventory", "extra_vars"), [
    ("local.yml", {}),
    ("local.yml", {"snowpipe_known_hosts": ""}),
    ("euler.yml", {}),
    ("euler.yml", {"ansible_port": "2200", "ansible_ssh_private_key_file": "~/my keys/id_ed25519",
                   "snowpipe_known_hosts": "/tmp/ssh dir/known_hosts"}),
], ids=["local", "local-default-known-hosts", "euler", "euler-key-and-spaces"])
def test_ansible_rsync_and_the_ssh_tools_use_identical_options(ansible_view, inventory, extra_vars, tmp_path):
    ansible_argv, stage_data_rsh, record = ansible_view(inventory, extra_vars, tmp_path)
    expected = ssh_options(record)  # what the SSH tools will connect with, from the run record
    assert stage_data_rsh == expected.rsh() == rsync_shell(record)  # the data sync and `snowpipe fetch`
    ours, ansible = read_ssh(expected.argv()), read_ssh(ansible_argv)
    assert {name: ansible.get(name) for name in ours} == ours, ansible_argv
    assert set(ansible) - set(ours) <= ANSIBLE_OWN, ansible_argv
    assert ours["stricthostkeychecking"] == ("yes",) and ours["batchmode"] == ("yes",)
    assert ("identitiesonly" in ours) == ("identityfile" in ours)


def test_the_local_inventory_reaches_the_embedded_cluster_with_its_own_options(ansible_view, tmp_path):
    _, _, record = ansible_view("local.yml", {}, tmp_path)
    info = cluster_info(ClusterPaths(REPO_ROOT / ".cluster"))
    assert (record.address, record.port, record.user) == (info.host, info.port, info.user)
    assert ssh_options(record) == info.ssh_options()
    assert info.ssh_command("true") == [*info.ssh_options().argv(), f"{info.user}@{info.host}", "true"]
