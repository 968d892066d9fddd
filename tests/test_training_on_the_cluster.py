"""A training job on the real local SLURM cluster, stopped the ways a cluster stops jobs: `snowpipe cancel`
(scancel: SIGTERM to every process of the job, two data-loading workers included), `scontrol requeue` (a node
drained, a job moved) and the time-limit warning (SIGUSR1 to the batch shell). Checkpoints are on the run
folder's shared storage while the job runs, so a job that starts again on any node resumes from them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.model.checkpoint import read_checkpoint
from pipeline.submit.plan import REPO_ROOT
from tests.playbooks import playbook

pytestmark = pytest.mark.cluster

SESSION = time.strftime("%H%M%S")
EPOCHS = 120
SMALL_JOBS = {"*": {"cpus": 1, "memory": "1G", "tmp": "0", "time": "01:00:00"}}


def squeue(cluster, *args: str) -> str:
    return subprocess.run(["squeue", "--noheader", *args], env=cluster.env(), capture_output=True, text=True,
                          check=True).stdout.strip()


def scontrol(cluster, *args: str) -> str:
    return subprocess.run(["scontrol", *args], env=cluster.env(), capture_output=True, text=True, check=True).stdout


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def start_requeued_job_now(cluster, job: str, what: str) -> None:
    """Wait for the requeued job to be pending, then skip SLURM's requeue delay (the job credential's lifetime,
    120 s). Not at once: slurmd refuses to launch a job whose credential was revoked in the same second
    ("Job credential revoked"; the job then fails), so the relaunch waits past the second of the kill."""
    wait_for(lambda: "PENDING" in squeue(cluster, "-j", job, "-o", "%T"), what)
    time.sleep(2)
    scontrol(cluster, "update", f"jobid={job}", "StartTime=now")


def saved_epoch(last: Path) -> int:
    try:
        return int(read_checkpoint(last)["epoch"])
    except Exception:  # not there yet, or being replaced
        return -1


def train_job(run_id: str) -> str:
    record = json.loads((REPO_ROOT / "runs" / f"{run_id}.json").read_text())
    return [job["id"] for job in record["jobs"] if job["name"] == "train"][-1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo data and a config whose training takes a minute: 120 short epochs, two loader workers."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out), "--scenes", "3", "--size", "128"]) == 0
    path = out / "pipeline-config.yml"
    config = yaml.safe_load(path.read_text())
    config["training"].update({"epochs": EPOCHS, "workers": 2, "model": {"base_channels": 8, "depth": 2},
                               "early_stopping_patience": EPOCHS, "lr_patience": EPOCHS})
    config["inference"]["enable"] = config["testing"]["enable"] = False
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_cancelled_training_stays_cancelled_and_a_requeued_one_resumes_from_shared_storage(local_cluster, demo):
    run_id = f"t{SESSION}-train"
    overrides = json.dumps({"snowpipe_job_overrides": SMALL_JOBS})
    try:
        result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", overrides)
        assert result.returncode == 0, result.stdout[-3000:]
        run_dir = local_cluster.remote_root / "runs" / run_id
        last = run_dir / "results" / "training" / "last.pt"
        job = train_job(run_id)

        # While the job runs, every epoch's checkpoint is already on shared storage.
        wait_for(lambda: saved_epoch(last) >= 2, "epoch 2 in the run folder")
        assert squeue(local_cluster, "-j", job, "-o", "%T") == "RUNNING"

        # The same submission again while it runs is refused, naming the run; so is adding its train job again.
        again = playbook("-e", f"config={demo}", "-e", overrides)
        assert again.returncode != 0 and f"run {run_id} is this same submission" in again.stdout, again.stdout[-3000:]
        assert "-e force=true" in again.stdout
        again = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "job=train", "-e", overrides)
        assert again.returncode != 0 and f"job train (id {job}) is still RUNNING" in again.stdout
        assert squeue(local_cluster, "-n", "train", "-o", "%i") == job  # nothing was submitted twice

        # snowpipe cancel: scancel sends SIGTERM to the job's processes; the trainer saves and nothing comes back.
        assert main(["cancel", run_id, "train", "--yes"]) == 0
        wait_for(lambda: (run_dir / "logs" / f"train-{job}.exit").is_file(), "the exit marker")
        marker = json.loads((run_dir / "logs" / f"train-{job}.exit").read_text())
        assert marker["exit_code"] == 75  # saved; the stage asked to run again, and the script did not requeue
        time.sleep(3)
        assert squeue(local_cluster, "-j", job, "-o", "%T") == ""  # not pending again: cancel means cancel
        log = (run_dir / "logs" / f"train-{job}.out").read_text()
        assert "stopped by SIGTERM (scancel or preemption): state saved, not requeued" in log
        assert "DataLoader worker" not in log
        stopped_at = saved_epoch(last)
        assert 2 <= stopped_at < EPOCHS

        # Training again in the same run continues from the saved state.
        result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "job=train", "-e", overrides)
        assert result.returncode == 0, result.stdout[-3000:]
        job = train_job(run_id)
        wait_for(lambda: saved_epoch(last) >= stopped_at + 2, "progress after the resubmission")

        # The job is moved (scontrol requeue, as when its node is drained): it resumes from the shared last.pt.
        scontrol(local_cluster, "requeue", job)
        start_requeued_job_now(local_cluster, job, "the requeued job")
        moved_at = saved_epoch(last)
        wait_for(lambda: saved_epoch(last) >= moved_at + 2, "progress after the requeue")

        # The time-limit warning (what --signal=B:USR1@300 sends the batch shell): save, requeue itself, resume.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=local_cluster.env(), check=True)
        start_requeued_job_now(local_cluster, job, "the job requeuing itself")
        wait_for(lambda: squeue(local_cluster, "-j", job, "-o", "%T") == "", "the end of training", timeout=600)
        log = (run_dir / "logs" / f"train-{job}.out").read_text()
        assert re.search(r"saved before the time limit at epoch \d+ step \d+; requeue [12]/3", log), log[-3000:]
        history = json.loads((run_dir / "results" / "training" / "history.json").read_text())
        accounting = subprocess.run(["sacct", "-j", job, "--duplicates", "-X", "-o", "JobID,State,ExitCode,Start,End"],
                                    env=local_cluster.env(), capture_output=True, text=True).stdout
        assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1)), (  # each epoch once
            f"epochs {[record['epoch'] for record in history][-3:]} in history.json\n{accounting}\n{log[-4000:]}")
        assert saved_epoch(last) == EPOCHS
        assert log.count("resum") >= 3, log[-3000:]  # the resubmission and both requeues resumed
    finally:
        subprocess.run(["scancel", "--name=train"], env=local_cluster.env(), check=False)
        (REPO_ROOT / "runs" / f"{run_id}.json").unlink(missing_ok=True)
