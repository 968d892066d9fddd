"""The batch scripts a submission renders, checked without a cluster: a dry run (`-e dry_run=true`) renders them
from the plan and the template exactly as a real submission does, and sends nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.contract import formats
from pipeline.contract.plan import Plan
from pipeline.data import manifest as data_manifest
from pipeline.submit.plan import REPO_ROOT
from tests.playbooks import DRY_RUNS, playbook

GOLDEN = Path(__file__).parent / "golden"
SESSION = time.strftime("%H%M%S")
JOB_NAMES = ["annotate", "dataset", "decode", "infer", "test", "train"]


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
    assert f"decode=$(sbatch --parsable {plan.run_dir}/jobs/decode.sbatch)" in out
    assert "annotate=$(sbatch --parsable --dependency=aftercorr:$decode --kill-on-invalid-dep=yes" in out
    assert re.search(r"decoding needs up to [\d.]+ \w+ in \S+/data/decoded", out)
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
    assert len(scripts) == 6
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


def test_a_hostile_run_id_is_refused_before_anything_is_written(demo, tmp_path):
    escape = tmp_path / "escaped"
    result = playbook("-e", f"config={demo}", "-e", f"run_id=../../../../../../..{escape}", "-e", "dry_run=true")
    assert result.returncode != 0
    assert "is not allowed: use letters, digits" in result.stdout and "Traceback" not in result.stdout
    assert not escape.exists()


STOPPABLE_STAGE = """#!/bin/bash
# Stands in for `python -m pipeline stage train`: saves progress "$STEP" when told to stop, as the trainer does.
trap 'printf "epoch 1 step %s\\n" "$STEP" > "$SNOWPIPE_PROGRESS_FILE"; exit 75' USR1 TERM
touch "$STARTED"
while true; do sleep 0.05; done
"""


@pytest.fixture(scope="module")
def train_script(demo, tmp_path_factory) -> tuple[str, Path, Path]:
    """The rendered train job, pointed at a private run folder, with a stand-in stage and scontrol."""
    run_id = f"t{SESSION}-requeue"
    assert playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true").returncode == 0
    plan = Plan.model_validate_json((DRY_RUNS / run_id / "plan.json").read_text())
    tools = tmp_path_factory.mktemp("tools")
    (tools / "python").write_text(STOPPABLE_STAGE)
    (tools / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$SCONTROL_CALLS"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path_factory.mktemp("run")
    script = (DRY_RUNS / run_id / "jobs" / "train.sbatch").read_text().replace(plan.run_dir, str(run_dir))
    script = re.sub(r"^PYTHON=.*$", f"PYTHON={tools / 'python'}", script, flags=re.M)
    script = re.sub(r"^source .*activate.*$", "", script, flags=re.M)
    return script, run_dir, tools


def stop_the_train_job(train_script, tmp_path, signal_name: str, restarts: int, step: int) -> tuple[int, str, list]:
    """Run the train job's script once (as SLURM would, job 77, `restarts` requeues so far) and stop it."""
    script, run_dir, tools = train_script
    calls, started = tmp_path / f"scontrol-{restarts}", tmp_path / f"started-{restarts}"
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(restarts), "TMPDIR": str(tmp_path),
           "STEP": str(step), "SCONTROL_CALLS": str(calls), "STARTED": str(started),
           "PATH": f"{tools}:{os.environ['PATH']}"}
    env.pop("SNOWPIPE_LOCAL_RUN", None)
    job = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(getattr(signal, f"SIG{signal_name}"))  # to the batch shell, as SLURM does
    out, _ = job.communicate(timeout=60)
    return job.returncode, out, calls.read_text().split("\n")[:-1] if calls.exists() else []


def test_the_time_limit_warning_requeues_a_job_that_made_progress_and_only_then(train_script, tmp_path):
    code, out, calls = stop_the_train_job(train_script, tmp_path, "USR1", restarts=0, step=3)
    assert code == 75 and calls == ["requeue 77"], out  # saved at epoch 1 step 3: requeued
    assert "saved before the time limit at epoch 1 step 3; requeue 1/3" in out
    code, out, calls = stop_the_train_job(train_script, tmp_path, "USR1", restarts=1, step=5)
    assert code == 75 and calls == ["requeue 77"], out  # further on: requeued again
    code, out, calls = stop_the_train_job(train_script, tmp_path, "USR1", restarts=2, step=5)
    assert code == 1 and calls == [], out  # no further since the last requeue: it would only loop
    assert "no progress since the last requeue (epoch 1 step 5): not requeued" in out
    run_dir = train_script[1]
    (marker,) = [m for m in formats.read_exit_markers(run_dir / formats.LOG_FOLDER) if m.task == "77"]
    assert marker.exit_code == 1 and marker.state == "FAILED"


def test_a_cancelled_job_is_never_requeued_by_its_script(train_script, tmp_path):
    """scancel sends SIGTERM: the stage saves and exits 75, and the job stays cancelled."""
    code, out, calls = stop_the_train_job(train_script, tmp_path, "TERM", restarts=0, step=9)
    assert code == 75 and calls == [], out
    assert "stopped by SIGTERM (scancel or preemption): state saved, not requeued" in out


def test_no_secret_reaches_a_rendered_script_the_plan_or_the_frozen_config(demo):
    """Passwords given to Ansible and the private key stay with Ansible and ssh: nothing the run keeps holds them."""
    run_id = f"t{SESSION}-secret"
    secret = "Hunter2-s3cret-Passw0rd"
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true",
                      "-e", f"ansible_password={secret}", "-e", f"ansible_become_password={secret}")
    assert result.returncode == 0, result.stdout[-3000:]
    key = (REPO_ROOT / ".cluster" / "ssh" / "id_ed25519")
    key_body = key.read_text().splitlines()[1] if key.is_file() else "no key on this machine"
    kept = [path for path in (DRY_RUNS / run_id).rglob("*") if path.is_file()]
    assert len(kept) >= 7  # plan.json, config.json, COMMIT, five scripts
    for path in kept:
        text = path.read_text()
        assert secret not in text and key_body not in text, path
    assert secret not in result.stdout


def test_a_job_whose_synced_data_changed_fails_before_its_stage_naming_the_file(demo, tmp_path):
    """The cluster's copy of a scene differs from what was submitted (a cut transfer, a later sync, an edit):
    that scene's array task stops in its prepare step; another scene's task still passes its check."""
    run_id = f"t{SESSION}-verify"
    assert playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true").returncode == 0
    plan = Plan.model_validate_json((DRY_RUNS / run_id / "plan.json").read_text())
    assert plan.data_root is not None and plan.data_manifest is not None
    source = demo.parent / "extracted_data"
    data, run_dir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    subprocess.run(["rsync", "-a", f"{source}/", f"{data / 'extracted_data'}/"], check=True)  # the sync
    run_dir.mkdir()
    manifest = run_dir / "data-manifest.json"
    assert data_manifest.main([str(manifest), f"extracted_data={source}"]) == 0  # what stage_data writes
    frozen = (DRY_RUNS / run_id / "config.json").read_text()
    (run_dir / "config.json").write_text(frozen.replace(plan.run_dir, str(run_dir)).replace(plan.data_root, str(data)))
    first, second = plan.job("annotate").scene_ids[:2]
    tile, _, time = first.partition("_")  # scene id {TILE}_{YYYYMMDDTHHMMSS}
    band = next(data.glob(f"extracted_data/*_{time}_*_T{tile}_*.SAFE/GRANULE/*/IMG_DATA/*_B03.jp2"))
    content = bytearray(band.read_bytes())
    content[len(content) // 2] ^= 0xFF  # the cluster's copy is no longer the one submitted
    band.write_bytes(bytes(content))

    script = (DRY_RUNS / run_id / "jobs" / "annotate.sbatch").read_text()
    script = script.replace(plan.run_dir, str(run_dir)).replace(plan.data_root, str(data))
    env = {**os.environ, "SLURM_JOB_ID": "6", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "0",
           "TMPDIR": str(tmp_path)}
    ended = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    out = ended.stdout + ended.stderr
    assert ended.returncode == 1, out[-3000:]
    assert "1 of " in out and f"{band.relative_to(data).as_posix()}: content changed since submission" in out
    assert f"resubmit: ansible-playbook submit.yml -e run_id={run_id} -e job=annotate" in out
    assert "stage annotate --config" not in out  # the stage never started
    assert not (data / "annotated_masks" / first).exists()
    checked = subprocess.run([sys.executable, "-m", "pipeline", "verify-data", str(manifest), "--config",
                              str(run_dir / "config.json"), "--stage", "annotate", "--scene", second],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and "input file(s) as submitted" in checked.stderr, checked.stderr
