"""The README's table of Ansible role variables, generated from the roles' meta/argument_specs.yml (the one
place they are declared): `python -m pipeline.submit.role_docs` prints it; a test keeps the README in step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parent.parent.parent / "ansible" / "roles"


def variables_table(roles: Path = ROLES) -> str:
    rows: dict[str, dict] = {}
    for spec in sorted(roles.glob("*/meta/argument_specs.yml")):
        role = spec.parent.parent.name
        for entry in yaml.safe_load(spec.read_text())["argument_specs"].values():
            for name, option in (entry.get("options") or {}).items():
                row = rows.setdefault(name, {"roles": [], **option})
                row["roles"].append(role)
    lines = ["| variable | type | default | roles | meaning |", "|---|---|---|---|---|"]
    for name, row in sorted(rows.items()):
        default = "required" if row.get("required") else f"`{json.dumps(row.get('default'))}`"
        lines.append(f"| `{name}` | {row['type']} | {default} | {', '.join(sorted(set(row['roles'])))} | "
                     f"{row['description']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(variables_table())
    sys.exit(0)
