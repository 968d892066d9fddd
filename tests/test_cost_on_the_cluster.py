"""What a run cost and what the cluster offers, as a user meets them on the real embedded SLURM cluster (its
slurmdbd accounting): `snowpipe report` on a job that asks far more memory than it uses, checked against sacct read
by hand; `snowpipe probe` of the cluster's limits; and a plan asking a partition or a GPU type the cluster lacks,
refused by `snowpipe plan` and by the playbook before anything is sent. The report of a whole demo run is told in
tests/test_submission.py (it reuses that run)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cluster_facts import facts_path, load_facts
from pipeline.contract.formats import EXIT_CONFIG
from pipeline.monitor import runs
from pipeline.submit.plan import REPO_ROOT
from tests.cluster_fixture import need_accounting
from tests.playbooks import playbook

pytestmark = pytest.mark.cluster

HOLD_150_MIB = ("python3 -c 'import time; x = bytearray(150 * 2**20); t = time.time()\n"
                "while time.time() - t < 3: pass'")


def sacct(cluster, *args: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "--noheader", "--parsable2", *args], env=cluster.env(), capture_output=True,
                         text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(runs, "RUNS_DIR", folder)
    return folder


def test_a_job_that_asks_far_more_memory_than_it_uses_gets_advice_naming_the_key(local_cluster, runs_dir, tmp_path,
                                                                                 capsys):
    need_accounting(local_cluster)
    job_id = subprocess.run(["sbatch", "--parsable", "--job-name=infer", "--mem=3G", "--cpus-per-task=1",
                             f"--chdir={tmp_path}", f"--output={tmp_path}/%x-%j.out", "--wrap", HOLD_150_MIB],
                            env=local_cluster.env(), capture_output=True, text=True, check=True).stdout.strip()
    record = {"run_id": "greedy", "host": "local", "address": "127.0.0.1", "port": local_cluster.port,
              "user": local_cluster.user, "key": str(local_cluster.key), "known_hosts": str(local_cluster.known_hosts),
              "remote_dir": str(tmp_path), "submitted": "2026-12-04T00:00:00+00:00",
              "jobs": [{"name": "infer", "id": job_id, "stages": ["infer"]}]}
    (runs_dir / "greedy.json").write_text(json.dumps(record))
    wait_for(lambda: any(row[1] == "COMPLETED" and row[2] for row in
                         sacct(local_cluster, "-j", job_id, "--format=JobID,State,MaxRSS") if ".batch" in row[0]),
             90)

    assert main(["report", "greedy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (stage,) = report["stages"]
    by_hand = {row[0]: row for row in sacct(local_cluster, "-j", job_id, "--format=JobID,CPUTimeRAW,MaxRSS,ReqMem")}
    assert stage["name"] == "infer" and stage["tasks"] == 1 and stage["states"] == {"COMPLETED": 1}
    assert stage["cpu_hours"] == pytest.approx(int(by_hand[job_id][1]) / 3600, rel=0.1)
    assert stage["max_rss_bytes"] == pytest.approx(int(by_hand[f"{job_id}.batch"][2].rstrip("K")) * 1024, rel=0.1)
    assert 150 * 2**20 < stage["max_rss_bytes"] < 400 * 2**20 and stage["requested_mem_bytes"] == 3 * 2**30
    assert stage["gpu_hours"] == 0 and stage["gpu_busy"] is None  # no busy file in this run folder
    assert report["advice"] == [f"infer: asked 3.0 GiB of memory, its largest task used "
                                f"{stage['max_rss_bytes'] / 2**20:.1f} MiB: set `memory: 1G` in jobs/infer.yml"]
    assert (runs_dir / "greedy" / "results" / "report.png").stat().st_size > 10_000

    assert main(["report", "--no-png"]) == 0  # the newest run, as a table
    shown = capsys.readouterr().out
    assert "cost per stage (from sacct)" in shown and "advice: infer: asked 3.0 GiB" in shown


@pytest.fixture
def probed(local_cluster, capsys) -> Iterator[dict]:
    """`snowpipe probe` of the embedded cluster, its QOS given a submit limit for the while (the cluster enforces
    no limit, AccountingStorageEnforce=none, so nobody else's jobs notice). The project's facts for `local` are
    probed again afterwards, without that limit, so that later plans see the cluster as it is."""
    need_accounting(local_cluster)

    def qos(limit: str) -> None:
        subprocess.run(["sacctmgr", "--immediate", "modify", "qos", "normal", "set", f"MaxSubmitJobsPerUser={limit}"],
                       env=local_cluster.env(), capture_output=True, check=True)

    qos("5000")
    try:
        assert main(["probe", "--json"]) == 0
    finally:
        qos("-1")
    yield json.loads(capsys.readouterr().out)
    assert main(["probe", "--json"]) == 0 and load_facts(REPO_ROOT, "local")["max_submit_jobs"] is None


def test_probe_reads_the_clusters_limits_and_keeps_them_for_the_plan(local_cluster, probed, capsys):
    assert probed["host"] == "local" and probed["max_array_size"] == 1001 and probed["accounting"] is True
    (partition,) = probed["partitions"]
    assert (partition["name"], partition["default"], partition["time_limit_s"]) == (local_cluster.partition, True,
                                                                                     None)
    assert partition["gpus"] == {"": 2} and partition["cpus_per_node"] >= 1
    assert probed["max_submit_jobs"] == 5000 and probed["partial"] == []
    assert load_facts(REPO_ROOT, "local")["partitions"] == probed["partitions"]
    assert facts_path(REPO_ROOT, "local").is_file()
    assert main(["probe"]) == 0  # the table: a refresh
    assert "local (default)" in capsys.readouterr().out


def test_a_plan_asking_a_missing_partition_or_gpu_type_is_refused_before_anything_moves(local_cluster, probed,
                                                                                         tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "demo"), "--scenes", "2", "--size", "64"]) == 0
    config = tmp_path / "demo" / "pipeline-config.yml"
    capsys.readouterr()

    def plan(overrides: dict) -> tuple[int, str]:
        target = {"snowpipe_remote_root": str(local_cluster.remote_root), "snowpipe_job_overrides": overrides}
        code = main(["plan", str(config), "--host", "local", "--target-vars", json.dumps(target)])
        return code, capsys.readouterr().err

    code, err = plan({"train": {"partition": "gpu"}})
    assert code == EXIT_CONFIG and "job train: partition 'gpu' (key `partition`) does not exist on local; it " \
                                  "offers: local (default)" in err, err
    code, err = plan({"train": {"gpu_type": "a100"}})
    assert code == EXIT_CONFIG and "job train: GPU type 'a100' (key `gpu_type`) is not in partition local of " \
                                  "local; it offers 2 x untyped per node" in err, err
    assert plan({"*": {"memory": "1G", "cpus": 1}})[0] == 0  # what it offers passes

    run_id = f"refused-{time.strftime('%H%M%S')}"
    result = playbook("-e", f"config={config}", "-e", f"run_id={run_id}",
                      "-e", json.dumps({"snowpipe_job_overrides": {"train": {"partition": "gpu"}}}))
    assert result.returncode != 0 and "partition 'gpu' (key `partition`) does not exist on local" in result.stdout
    assert "TASK [stage_data" not in result.stdout  # stopped in preflight: no data sent
    assert not (local_cluster.remote_root / "runs" / run_id).exists()
    assert not (REPO_ROOT / "runs" / f"{run_id}.json").exists()
