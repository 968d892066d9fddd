"""The Ansible side as a reviewer checks it: lint-clean roles, every variable declared and documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.submit.plan import REPO_ROOT
from pipeline.submit.role_docs import variables_table

ROLES = REPO_ROOT / "ansible" / "roles"


def test_ansible_lint_passes_with_the_production_profile():
    lint = Path(sys.executable).parent / "ansible-lint"
    result = subprocess.run([str(lint), "--profile", "production", "--offline", "-q", "."], cwd=REPO_ROOT / "ansible",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_declares_its_variables_and_the_readme_lists_them():
    roles = sorted(p.name for p in ROLES.iterdir() if p.is_dir())
    assert roles == ["preflight", "record", "render_jobs", "stage_data", "submit"]
    for role in roles:
        specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
        assert specs["argument_specs"]["main"]["options"], role
    assert variables_table() in (REPO_ROOT / "README.md").read_text(), \
        "README's variable table is stale: python -m pipeline.submit.role_docs"


def test_every_snowpipe_variable_the_roles_read_is_declared():
    declared = set()
    for spec in ROLES.glob("*/meta/argument_specs.yml"):
        for entry in yaml.safe_load(spec.read_text())["argument_specs"].values():
            declared |= set(entry.get("options") or {})
    used = set()
    for path in [*ROLES.rglob("*.yml"), REPO_ROOT / "templates" / "job.sbatch.j2"]:
        used |= set(re.findall(r"\b(snowpipe_[a-z_]+)", path.read_text()))
    internal = {"snowpipe_job", "snowpipe_plan", "snowpipe_wait"}  # loop variables and the play's own switch
    assert used - internal <= declared, sorted(used - internal - declared)


def _declared_options(role: str) -> dict[str, dict]:
    options: dict[str, dict] = {}
    spec = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    for entry in spec["argument_specs"].values():
        options.update(entry.get("options") or {})
    return options


# In defaults/main.yml but not an argument: rsync's ssh command line, derived from the connection variables;
# tests/test_ssh_options.py reads it from that file. Other derived settings live in vars/main.yml.
DERIVED_DEFAULTS = {"stage_data": {"stage_data_rsh"}}


def test_every_role_defaults_file_mirrors_its_argument_specs():
    """As dev-sec does: each optional argument has a default in the spec, the same one in defaults/main.yml, and
    defaults/main.yml holds nothing else; no task falls back on an inline default() for a declared variable."""
    for role in sorted(p.name for p in ROLES.iterdir() if p.is_dir()):
        options = _declared_options(role)
        assert all(option.get("required") or "default" in option for option in options.values()), role
        declared = {name: option["default"] for name, option in options.items() if not option.get("required")}
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
        derived = DERIVED_DEFAULTS.get(role, set())
        assert {k: v for k, v in defaults.items() if k not in derived} == declared, role
        for path in (ROLES / role).rglob("*.yml"):
            inline = set(re.findall(r"\b(\w+)\s*\|\s*default\(", path.read_text())) & set(options)
            assert not inline, f"{path.relative_to(ROLES)}: inline default() for declared {sorted(inline)}"
