"""Running `ansible-playbook submit.yml` as a user does, for the submission and rendering tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.submit.plan import REPO_ROOT

ANSIBLE_DIR = REPO_ROOT / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
DRY_RUNS = REPO_ROOT / "build" / "dry-run"


def playbook(*args: str, cwd: Path = ANSIBLE_DIR, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run([str(PLAYBOOK), "submit.yml" if cwd == ANSIBLE_DIR else "ansible/submit.yml", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
