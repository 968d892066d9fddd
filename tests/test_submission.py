"""`ansible-playbook submit.yml` as a user runs it, against the real embedded SLURM cluster over SSH:
a demo submission to COMPLETED (with 2-process DDP training), incremental sync, check mode, sbatch --test-only,
local run and the errors a user meets first (rendering without a cluster: test_rendered_scripts.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.submit.plan import REPO_ROOT
from tests.playbooks import DRY_RUNS, playbook

pytestmark = pytest.mark.cluster

SMALL_JOBS = {"*": {"cpus": 1, "memory": "1G", "tmp": "0", "time": "01:00:00"}}
SESSION = time.strftime("%H%M%S")


def squeue_ids(cluster) -> set[str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=cluster.env(), capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


def job_state(cluster, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env(), capture_output=True,
                         text=True).stdout
    states = re.findall(r"JobState=(\w+)", out)
    return ",".join(sorted(set(states))) or "gone"


def task_times(cluster, job_id: str) -> dict[str, tuple[str, str]]:
    """Array task id -> (StartTime, EndTime) as scontrol shows them (ISO, sortable as text)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env(), capture_output=True,
                         text=True).stdout
    times = {}
    for block in out.split("JobId=")[1:]:
        task = re.search(r"ArrayTaskId=(\d+)", block)
        start, end = re.search(r"StartTime=(\S+)", block), re.search(r"EndTime=(\S+)", block)
        if task and start and end:
            times[task[1]] = (start[1], end[1])
    return times


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out), "--scenes", "3", "--size", "128"]) == 0
    return out / "pipeline-config.yml"


@pytest.fixture(scope="module")
def submitted(local_cluster, demo):
    """One demo submission, waited for, with training on the 2 declared GPUs (one process each)."""
    run_id = f"t{SESSION}-ddp"
    overrides = {**SMALL_JOBS, "train": {"gpus": 2}}
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "wait=true",
                      "-e", json.dumps({"snowpipe_job_overrides": overrides}))
    yield run_id, result
    (REPO_ROOT / "runs" / f"{run_id}.json").unlink(missing_ok=True)


def test_a_demo_submission_runs_every_job_to_completed(local_cluster, submitted, demo):
    run_id, result = submitted
    assert result.returncode == 0, result.stdout[-3000:]
    record = json.loads((REPO_ROOT / "runs" / f"{run_id}.json").read_text())
    assert [job["name"] for job in record["jobs"]] == ["decode", "annotate", "dataset", "train", "infer", "test"]
    ids = [job["id"] for job in record["jobs"]]
    assert all(i.isdigit() for i in ids)
    assert [job["after"] for job in record["jobs"]] == [[], [ids[0]], [ids[1]], [ids[2]], [ids[3], ids[0]], [ids[4]]]
    assert record["jobs"][0]["array"] == "0-2" and record["jobs"][1]["array"] == "0-2"
    # annotate task i started once decode task i had ended (aftercorr), not after the whole decode array
    decoded, annotated = task_times(local_cluster, ids[0]), task_times(local_cluster, ids[1])
    assert sorted(decoded) == sorted(annotated) == ["0", "1", "2"]
    assert all(annotated[task][0] >= decoded[task][1] for task in decoded), (decoded, annotated)
    assert record["host"] == "local" and record["remote_dir"].endswith(f"/runs/{run_id}")
    for job_id in ids:
        assert job_state(local_cluster, job_id) == "COMPLETED"
    run_dir = Path(record["remote_dir"])
    masks = sorted(run_dir.glob("results/predictions/*/mask.tif"))
    assert len(masks) == 3
    assert (run_dir / "results/testing/metrics.json").is_file()
    markers = [json.loads(p.read_text()) for p in (run_dir / "logs").glob("*.exit")]
    assert len(markers) == 3 + 3 + 1 + 1 + 3 + 1 and all(m["exit_code"] == 0 for m in markers)
    # decoded once on the cluster, beside the synced data, for every run to share
    assert len(list((run_dir.parent.parent / "data" / "decoded").glob("*.SAFE/B02.tif"))) >= 3
    train_log = next((run_dir / "logs").glob("train-*.out")).read_text()
    assert "srun --ntasks=2" in train_log and "2 process(es)" in train_log
    assert json.loads((run_dir / "config.json").read_text())["paths"]["results"] == f"{run_dir}/results"
    assert (run_dir / "code/pipeline/cli.py").is_file()


def test_submitting_a_finished_run_again_submits_nothing_and_sends_nothing(local_cluster, submitted, demo):
    """The same code, job spec, config and data as a run that finished with every task COMPLETED: the preflight
    says so and ends the play before the sync; `-e force=true` would run it again."""
    run_id, first = submitted
    assert first.returncode == 0, first.stdout[-3000:]
    again = f"{run_id}-again"
    overrides = {**SMALL_JOBS, "train": {"gpus": 2}}
    try:
        result = playbook("-e", f"config={demo}", "-e", f"run_id={again}",
                          "-e", json.dumps({"snowpipe_job_overrides": overrides}), "-v")
    finally:
        (REPO_ROOT / "runs" / f"{again}.json").unlink(missing_ok=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"run {run_id} is this same submission" in result.stdout and "nothing to submit and nothing sent" in \
        result.stdout
    assert "Sync data with rsync" not in result.stdout and "Submit each job" not in result.stdout  # ended before
    before = (REPO_ROOT / "runs" / f"{run_id}.json").read_text()
    into = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}",  # into the finished run itself
                    "-e", json.dumps({"snowpipe_job_overrides": overrides}), "-v")
    assert into.returncode == 0 and f"run {run_id} is this same submission" in into.stdout, into.stdout[-3000:]
    assert "Submit each job" not in into.stdout and (REPO_ROOT / "runs" / f"{run_id}.json").read_text() == before


def test_a_second_submission_with_unchanged_data_sends_no_data_file(local_cluster, submitted, demo):
    run_id, _ = submitted
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "job=test", "-e", "wait=true",
                      "-e", json.dumps({"snowpipe_job_overrides": SMALL_JOBS}), "-v")
    assert result.returncode == 0, result.stdout[-3000:]
    itemised = re.findall(r"^[<>ch.][fdL]\S* .*$", result.stdout, flags=re.M)
    assert not [line for line in itemised if line.startswith(">f")], itemised
    assert "extracted_data: 0 file(s) sent" in result.stdout
    record = json.loads((REPO_ROOT / "runs" / f"{run_id}.json").read_text())
    assert [job["name"] for job in record["jobs"]][-1] == "test" and len(record["jobs"]) == 7


def test_rendered_scripts_are_accepted_by_sbatch_test_only(local_cluster, demo):
    """What SLURM itself says of the scripts (bash, shellcheck and the golden files: tests/test_rendered_scripts.py)."""
    run_id = f"t{SESSION}-lint"
    assert playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "dry_run=true").returncode == 0
    scripts = sorted((DRY_RUNS / run_id / "jobs").glob("*.sbatch"))
    assert len(scripts) == 6
    for script in scripts:
        test_only = subprocess.run(["sbatch", "--test-only", str(script)], env=local_cluster.env(),
                                   capture_output=True, text=True)
        assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr


def test_check_mode_shows_the_scripts_as_diffs_and_changes_nothing(local_cluster, demo):
    run_id = f"t{SESSION}-check"
    before = squeue_ids(local_cluster)
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "--check", "--diff")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "+#SBATCH --job-name=train" in result.stdout
    assert "fatal:" not in result.stdout
    assert not (local_cluster.remote_root / "runs" / run_id).exists()
    assert not (REPO_ROOT / "runs" / f"{run_id}.json").exists()
    assert squeue_ids(local_cluster) == before


def test_a_local_run_executes_the_scripts_here_with_the_same_outputs(local_cluster, submitted, demo):
    run_id = f"t{SESSION}-local"
    result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "local_run=true")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "every job completed" in result.stdout
    local = REPO_ROOT / "build" / "local-run" / "runs" / run_id / "results"
    cluster = local_cluster.remote_root / "runs" / submitted[0] / "results"

    def outputs(results: Path) -> set[str]:
        return {str(p.relative_to(results)) for folder in ("predictions", "testing")
                for p in (results / folder).rglob("*") if p.is_file()}

    assert outputs(local) == outputs(cluster) and len(outputs(local)) > 10
    shutil.rmtree(local.parent)


def test_an_unreachable_cluster_is_one_clear_message(local_cluster, demo):
    result = playbook("-e", f"config={demo}", "-e", "ansible_port=1")
    assert result.returncode != 0
    assert "cannot reach local" in result.stdout and "snowpipe cluster up" in result.stdout


def test_a_wrong_config_key_stops_before_anything_moves(local_cluster, tmp_path):
    config = tmp_path / "pipeline-config.yml"
    config.write_text("tile_id: 32TNS\ntraning: {epochs: 3}\n")
    result = playbook("-e", f"config={config}")
    assert result.returncode != 0
    assert "traning: unknown key" in result.stdout


def test_after_a_submission_status_logs_and_fetch_tell_what_happened(local_cluster, submitted, tmp_path, capsys):
    run_id, result = submitted
    assert result.returncode == 0
    assert main(["status", run_id, "--watch", "--interval", "2"]) == 0
    assert "COMPLETED" in capsys.readouterr().out
    assert main(["status", run_id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "COMPLETED" and len(data["jobs"]) >= 9  # 10 once a test job was added to the run
    assert {row["state"] for row in data["jobs"]} == {"COMPLETED"}
    assert main(["logs", run_id, "train", "--lines", "500"]) == 0
    assert "srun --ntasks=2" in capsys.readouterr().out
    assert main(["fetch", run_id, str(tmp_path / "back")]) == 0
    assert len(list((tmp_path / "back" / "results" / "predictions").glob("*/mask.tif"))) == 3
    capsys.readouterr()
    assert main(["status", "no-such-run"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_a_failed_job_fails_a_waited_submission_and_names_the_logs(local_cluster, demo):
    """A run of the test job alone has no predictions to score: the job fails, and `-e wait=true` says so."""
    run_id = f"t{SESSION}-fails"
    try:
        result = playbook("-e", f"config={demo}", "-e", f"run_id={run_id}", "-e", "job=test", "-e", "wait=true",
                          "-e", json.dumps({"snowpipe_job_overrides": SMALL_JOBS}))
        assert result.returncode != 0, result.stdout[-3000:]
        assert "1 of 1 task(s) did not complete (test FAILED)" in result.stdout, result.stdout[-3000:]
        assert f"/runs/{run_id}/logs/test-" in result.stdout
    finally:
        (REPO_ROOT / "runs" / f"{run_id}.json").unlink(missing_ok=True)


def _sacct_bytes(text: str) -> float:
    """sacct's MaxRSS as printed: a number and a binary unit (`2048K`, `468.50M`)."""
    scale = 1024 ** "KMGTP".index(text[-1]) * 1024 if text[-1] in "KMGTP" else 1
    return float(text.rstrip("KMGTP")) * scale


def test_the_report_of_a_demo_run_agrees_with_sacct_read_by_hand(local_cluster, submitted, capsys):
    """`snowpipe report --json` (issue 25): per stage CPU- and GPU-hours, CPU efficiency and peak memory within 10 % of
    sacct's own numbers for the run's jobs; train and infer measured their busy fraction; the PNG lies in the run's
    local results folder."""
    from tests.cluster_fixture import need_accounting

    need_accounting(local_cluster)
    run_id, result = submitted
    assert result.returncode == 0
    record = json.loads((REPO_ROOT / "runs" / f"{run_id}.json").read_text())
    try:
        assert main(["report", run_id, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["source"] == "sacct" and (REPO_ROOT / "runs" / run_id / "results" / "report.png").is_file()
        stages = {stage["name"]: stage for stage in report["stages"]}
        assert list(stages) == ["decode", "annotate", "dataset", "train", "infer", "test"]
        for name, stage in stages.items():
            ids = ",".join(job["id"] for job in record["jobs"] if job["name"] == name)
            rows = [line.split("|") for line in subprocess.run(
                ["sacct", "--jobs", ids, "--duplicates", "--noheader", "--parsable2",
                 "--format=JobID,CPUTimeRAW,TotalCPU,AllocTRES,ElapsedRaw,MaxRSS"], env=local_cluster.env(),
                capture_output=True, text=True, check=True).stdout.splitlines()]
            tasks = [row for row in rows if "." not in row[0]]
            cpu_s = sum(int(row[1]) for row in tasks)
            gpu_s = sum(int(re.search(r"gres/gpu=(\d+)", row[3])[1]) * int(row[4]) for row in tasks
                        if "gres/gpu=" in row[3])
            used = sum(sum(float(part) * 60 ** i for i, part in enumerate(reversed(row[2].split(":"))))
                       for row in tasks)
            rss = max((_sacct_bytes(row[5]) for row in rows if row[5]), default=None)
            assert stage["cpu_hours"] == pytest.approx(cpu_s / 3600, rel=0.1), name
            assert stage["gpu_hours"] == pytest.approx(gpu_s / 3600, rel=0.1), name
            assert stage["cpu_efficiency"] == pytest.approx(used / cpu_s, rel=0.1, abs=0.01), name
            assert rss is None or stage["max_rss_bytes"] == pytest.approx(rss, rel=0.1), name
        assert stages["train"]["gpu_hours"] > 0 and stages["infer"]["gpu_hours"] > 0  # the gres GPUs
        assert 0 < stages["train"]["gpu_busy"] <= 1 and 0 < stages["infer"]["gpu_busy"] <= 1
        assert report["total"]["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in stages.values()), rel=1e-3)
        assert main(["report", run_id, "--no-png"]) == 0
        table = capsys.readouterr().out
        assert "decode" in table and "total" in table and "advice:" in table
    finally:
        shutil.rmtree(REPO_ROOT / "runs" / run_id, ignore_errors=True)
