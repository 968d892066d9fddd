"""The batch scripts a submission renders, checked without a cluster: a dry run (`-e dry_run=true`) renders them
from the plan and the template exactly as a real submission does, and sends nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.contract import formats
from pipeline.contract.plan import Plan
from pipeline.submit.plan import REPO_ROOT
from tests.playbooks import DRY_RUNS, playbook

GOLDEN = Path(__file__).parent / "golden"
SESSION = time.strftime("%H%M%S")
JOB_NAMES = ["annotate", "dataset", "infer", "test", "train"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out), "--scenes", "3", "--size", "128"]) == 0
    return out / "pipeline-config.yml"


@pytest.mark.parametrize("inventory", ["local", "euler"])
def test_rendered_scripts_match_the_golden_files(demo, inventory):
    run_id = f"golden-{inventory}"
    result = playbook("-i", f"../inventory/{inventory}.yml", "-e", f"config={demo}", "-e", f"run_id={run_id}",
                      "-e", "dry_run=true")
    assert result.returncode == 0, result.stdout[-3000:]
    golden = GOLDEN / inventory
    scripts = sorted((DRY_RUNS / run_id / "jobs").glob("*.sbatch"))
    assert [script.stem for script in scripts] == JOB_NAMES
    for script in scripts:
        text = script.read_text().replace(str(REPO_ROOT), "<repo>")
        if os.environ.get("UPDATE_GOLDEN"):
            golden.mkdir(parents=True, exist_ok=True)
            (golden / script.name).write_text(text)
        assert text == (golden / script.name).read_text(), f"{script.name} differs from {golden}"


def test_dry_run_contacts_no_host_and_prints_the_plan(demo):
    run_id = f"t{SESSION}-dry"
    # A port nobody listens on: the dry run must not need the cluster at all.
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true",
                      "-e", "ansible_port=1", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert re.search(r"would sync \d+ data files", out)
    plan = Plan.model_validate_json((DRY_RUNS / run_id / "plan.json").read_text())
    assert f"annotate=$(sbatch --parsable {plan.run_dir}/jobs/annotate.sbatch)" in out
    assert "dataset=$(sbatch --parsable --dependency=afterok:$annotate --kill-on-invalid-dep=yes" in out
    assert sorted(p.stem for p in (DRY_RUNS / run_id / "jobs").iterdir()) == JOB_NAMES
    assert not Path(plan.run_dir).exists()
    assert not (REPO_ROOT / "runs" / f"{run_id}.json").exists()
    # what a batch job will read: the frozen config, with the version its reader checks
    assert json.loads((DRY_RUNS / run_id / "config.json").read_text())["schema"] == formats.CONFIG_SCHEMA


def test_rendered_scripts_pass_bash_and_shellcheck(demo):
    run_id = f"t{SESSION}-lint"
    assert playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true").returncode == 0
    scripts = sorted((DRY_RUNS / run_id / "jobs").glob("*.sbatch"))
    assert len(scripts) == 5
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        checked = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


def test_the_exit_marker_a_script_writes_is_the_one_the_monitor_reads(demo, tmp_path):
    """The script's cleanup, run for real without SLURM: its marker parses, with the exit code of the stage."""
    run_id = f"t{SESSION}-marker"
    assert playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true").returncode == 0
    script = (DRY_RUNS / run_id / "jobs" / "test.sbatch").read_text()
    run_dir = tmp_path / "run"
    plan = Plan.model_validate_json((DRY_RUNS / run_id / "plan.json").read_text())
    # The stage itself fails at once (no interpreter there); the cleanup still records how it ended.
    script = script.replace(plan.run_dir, str(run_dir)).replace(f"PYTHON={plan.python}", "PYTHON=/nonexistent/python")
    env = {**os.environ, "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path)}
    ended = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    (marker,) = formats.read_exit_markers(run_dir / formats.LOG_FOLDER)
    assert marker.job == "test" and marker.task == "4242" and marker.exit_code == ended.returncode != 0
    assert marker.state == "FAILED" and marker.end
