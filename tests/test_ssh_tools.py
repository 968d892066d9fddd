"""`snowpipe runs / status / logs / fetch / cancel` as a user meets them after walking away from a submission,
against the real local SLURM cluster over SSH (host keys checked)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.contract.formats import EXIT_MARKER_PRINTF
from pipeline.contract.run_record import RunRecord
from pipeline.localcluster import embedded
from pipeline.monitor import runs, tools
from tests.cluster_fixture import need_accounting

pytestmark = pytest.mark.cluster


def sbatch(cluster, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], env=cluster.env(), capture_output=True, text=True,
                         check=True).stdout
    return out.strip().split(";")[0]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def marker_line(name: str) -> str:
    """What the batch scripts' cleanup writes: the exit marker of this job (or array task)."""
    return ('tag=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}; '
            f'printf \'{EXIT_MARKER_PRINTF}\' {name} "$tag" "$code" "$(hostname)" "$(date -Is)" '
            f'> logs/{name}-$tag.exit')


def job(name: str, job_id: str, array: str | None = None) -> dict:
    log = "logs/%x-%A_%a.out" if array else "logs/%x-%j.out"
    return {"name": name, "id": job_id, "after": [], "array": array, "stages": [], "log": log}


@pytest.fixture
def run_dir(local_cluster, tmp_path) -> Path:
    """The run folder on the cluster (jobs run in it and write logs/ there)."""
    folder = local_cluster.remote_root / "runs" / f"tools-{tmp_path.name}"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def run_factory(local_cluster, run_dir, tmp_path, monkeypatch):
    """Write run records the way the submit playbook does, into a private runs/ folder."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    monkeypatch.setattr(runs, "RUNS_DIR", runs_dir)
    monkeypatch.setattr(tools, "RUNS_DIR", runs_dir)

    def make(run_id: str, jobs: list[dict], **connection) -> dict:
        remote_dir = run_dir
        for item in jobs:
            item["log"] = f"{remote_dir}/{item['log']}"
        record = {"run_id": run_id, "host": "local", "address": "127.0.0.1", "port": local_cluster.port,
                  "user": local_cluster.user, "key": str(local_cluster.key),
                  "known_hosts": str(local_cluster.known_hosts), "remote_dir": str(remote_dir),
                  "remote_root": str(local_cluster.remote_root), "commit": "abc", "config_hash": "x",
                  "submitted": time.strftime("%Y-%m-%dT%H:%M:%S+00:00"), "jobs": jobs, **connection}
        (runs_dir / f"{run_id}.json").write_text(json.dumps(record))
        return record

    return make


def status_json(run_id: str, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["status", run_id, "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("accounting", [True, False], ids=["sacct", "squeue-fallback"])
def test_status_reports_every_kind_of_job_then_cancel_ends_the_rest(local_cluster, run_factory, run_dir, capsys,
                                                                    accounting):
    if accounting:
        need_accounting(local_cluster)
    common = ["--chdir", str(run_dir), "--output", "logs/%x-%j.out", "--mem=100M", "--cpus-per-task=1"]
    done = sbatch(local_cluster, *common, "--job-name=ok", "--wrap", f"echo hello; code=0; {marker_line('ok')}")
    bad = sbatch(local_cluster, *common, "--job-name=bad",
                 "--wrap", f"echo broken; code=3; {marker_line('bad')}; exit 3")
    array = sbatch(local_cluster, "--chdir", str(run_dir), "--output", "logs/%x-%A_%a.out", "--mem=100M",
                   "--array=0-2", "--job-name=arr", "--wrap", f"echo task $SLURM_ARRAY_TASK_ID; code=0; "
                                                              f"{marker_line('arr')}")
    running = sbatch(local_cluster, *common, "--job-name=long", "--wrap", "echo working; sleep 120")
    pending = sbatch(local_cluster, *common, "--job-name=later", f"--dependency=afterok:{running}", "--wrap", "true")
    cancelled = sbatch(local_cluster, *common, "--job-name=gone", "--begin=now+1hour", "--wrap", "true")
    subprocess.run(["scancel", cancelled], env=local_cluster.env(), check=True)
    run_id = f"kinds-{'sacct' if accounting else 'squeue'}"
    run_factory(run_id, [job("ok", done), job("bad", bad), job("arr", array, "0-2"), job("long", running),
                         job("later", pending), job("gone", cancelled)])
    extra = [] if accounting else ["--no-sacct"]

    def settled() -> bool:
        _, data = status_json(run_id, capsys, *extra)
        states = {(row["name"], row["task"]): row["state"] for row in data["jobs"]}
        return (states[("ok", None)] == "COMPLETED" and states[("bad", None)] == "FAILED"
                and states[("long", None)] == "RUNNING" and all(states[("arr", t)] == "COMPLETED" for t in range(3)))

    wait_for(settled, 60)
    code, data = status_json(run_id, capsys, *extra)
    assert code == 3 and data["run"] == run_id and data["state"] == "RUNNING"
    assert data["source"] == ("sacct" if accounting else "squeue")
    rows = {(row["name"], row["task"]): row for row in data["jobs"]}
    assert rows[("later", None)]["state"] == "PENDING" and "Dependency" in rows[("later", None)]["reason"]
    assert rows[("gone", None)]["state"] == "CANCELLED"
    assert rows[("bad", None)]["exit_code"].startswith("3") and rows[("bad", None)]["last_line"] == "broken"
    assert rows[("arr", 2)]["last_line"] == "task 2" and rows[("long", None)]["node"] == local_cluster.node

    assert main(["cancel", run_id, "--yes"]) == 0
    wait_for(lambda: status_json(run_id, capsys, *extra)[1]["state"] != "RUNNING", 30)
    code, data = status_json(run_id, capsys, *extra)
    rows = {(row["name"], row["task"]): row for row in data["jobs"]}
    assert code == 1 and data["state"] == "FAILED"
    assert rows[("long", None)]["state"] == "CANCELLED" and rows[("later", None)]["state"] == "CANCELLED"

    assert main(["status", run_id, *extra]) == 1
    captured = capsys.readouterr()
    table = captured.out
    arr = next(line for line in table.splitlines() if line.startswith("│ arr "))
    assert "│ 3 " in arr and "3 COMPLETED" in arr and "CANCELLED" in table, captured.err


def test_a_stage_split_into_chunks_is_one_job_to_status_logs_and_cancel(local_cluster, run_factory, run_dir,
                                                                         capsys):
    """annotate's 10 scenes in chunks of 4 (as the plan splits a stage past MaxArraySize): its task 5 (chunk 2,
    task 1) fails; then infer's two chunks wait, and `cancel RUN infer` ends both."""
    chunks = []
    for k, (first, count) in enumerate([(0, 4), (4, 4), (8, 2)], start=1):
        script = (f"scene=$(({first} + SLURM_ARRAY_TASK_ID)); echo scene $scene; code=0; "
                  f"[ $scene = 5 ] && code=1; {marker_line(f'annotate.{k}')}; exit $code")
        job_id = sbatch(local_cluster, "--chdir", str(run_dir), "--output", "logs/%x-%A_%a.out", "--mem=50M",
                        f"--array=0-{count - 1}", f"--job-name=annotate.{k}", "--wrap", script)
        chunks.append({**job(f"annotate.{k}", job_id, f"0-{count - 1}"), "chunk_of": "annotate"})
    run_factory("chunked", chunks)
    wait_for(lambda: status_json("chunked", capsys)[0] != 3, 90)

    code, data = status_json("chunked", capsys)
    assert code == 1 and data["state"] == "FAILED"
    assert data["by_job"] == [{"name": "annotate", "ids": [chunk["id"] for chunk in chunks], "chunks": 3,
                               "tasks": 10, "state": "FAILED", "counts": {"COMPLETED": 9, "FAILED": 1},
                               "flagged": [f"{chunks[1]['id']}_1"]}]
    assert main(["status", "chunked"]) == 1
    table = capsys.readouterr().out
    assert [line for line in table.splitlines() if line.startswith("│ annotate")] == [
        next(line for line in table.splitlines() if "annotate (3 chunks)" in line)]
    assert "9 COMPLETED, 1 FAILED" in table and f"{chunks[1]['id']}_1" in table and "task 5" in table

    assert main(["logs", "chunked", "annotate", "--task", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "scene 5\n" and "is task 1 of its chunk annotate.2" in captured.err
    assert main(["logs", "chunked", "annotate", "--task", "9"]) == 0 and capsys.readouterr().out == "scene 9\n"

    waiting = [sbatch(local_cluster, "--chdir", str(run_dir), "--output", "logs/%x-%A_%a.out", "--mem=50M",
                      "--array=0-1", f"--job-name=infer.{k}", "--begin=now+1hour", "--wrap", "true") for k in (1, 2)]
    run_factory("chunked-waits", [{**job(f"infer.{k}", job_id, "0-1"), "chunk_of": "infer"}
                                  for k, job_id in enumerate(waiting, start=1)])
    assert main(["cancel", "chunked-waits", "infer", "--yes"]) == 0
    assert f"cancelled {', '.join(waiting)}" in capsys.readouterr().err
    wait_for(lambda: status_json("chunked-waits", capsys)[1]["state"] == "CANCELLED", 30)
    assert status_json("chunked-waits", capsys)[1]["by_job"][0]["counts"] == {"CANCELLED": 4}


def test_a_job_that_left_the_queue_keeps_its_true_final_state(local_cluster, run_factory, run_dir, capsys):
    embedded.up(min_job_age=2)  # slurmctld forgets finished jobs after 2 s
    try:
        common = ["--chdir", str(run_dir), "--output", "logs/%x-%j.out", "--mem=100M"]
        ok = sbatch(local_cluster, *common, "--job-name=quick", "--wrap", f"code=0; {marker_line('quick')}")
        bad = sbatch(local_cluster, *common, "--job-name=oops", "--wrap", f"code=2; {marker_line('oops')}; exit 2")
        forgotten = lambda i: "Invalid job id" in subprocess.run(  # noqa: E731
            ["scontrol", "show", "job", i], env=local_cluster.env(), capture_output=True, text=True).stderr
        wait_for(lambda: forgotten(ok) and forgotten(bad), 120)
        run_factory("forgotten", [job("quick", ok), job("oops", bad)])
        code, data = status_json("forgotten", capsys, "--no-sacct")
        assert [row["state"] for row in data["jobs"]] == ["COMPLETED", "FAILED"] and code == 1
        assert "exit marker" in data["jobs"][0]["reason"]
    finally:
        embedded.up(min_job_age=300)


def test_logs_fetch_runs_and_watch_after_a_finished_run(local_cluster, run_factory, run_dir, capsys, tmp_path):
    common = ["--chdir", str(run_dir), "--mem=100M"]
    one = sbatch(local_cluster, *common, "--output", "logs/%x-%j.out", "--job-name=train",
                 "--wrap", f"for i in 1 2 3; do echo epoch $i; done; mkdir -p results; echo 1 > results/m.txt; "
                       f"code=0; {marker_line('train')}")
    arr = sbatch(local_cluster, *common, "--output", "logs/%x-%A_%a.out", "--array=0-1", "--job-name=infer",
                 "--wrap", f"echo scene $SLURM_ARRAY_TASK_ID; code=0; {marker_line('infer')}")
    run_factory("finished", [job("train", one), job("infer", arr, "0-1")])
    wait_for(lambda: status_json("finished", capsys)[0] == 0, 60)

    assert main(["status", "finished", "--watch", "--interval", "2"]) == 0  # done: returns at once
    capsys.readouterr()
    assert main(["logs", "finished", "train", "--lines", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["epoch 2", "epoch 3"]
    assert main(["logs", "finished", "infer", "--task", "1"]) == 0
    assert "scene 1" in capsys.readouterr().out
    assert main(["logs", "finished", "infer", "--follow"]) == 0  # the job has ended: follow stops by itself
    assert "scene 0" in capsys.readouterr().out

    dest = tmp_path / "fetched"
    assert main(["fetch", "finished", str(dest)]) == 0
    assert (dest / "results/m.txt").read_text() == "1\n" and (dest / "logs" / f"train-{one}.out").is_file()
    capsys.readouterr()
    assert main(["fetch", "finished", str(dest)]) == 0  # again: only what changed, here nothing
    assert "fetched 0 changed file(s)" in capsys.readouterr().err

    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    assert "finished" in listing and "COMPLETED" in listing


def test_mistakes_and_network_trouble_are_one_clear_line(local_cluster, run_factory, tmp_path, capsys):
    assert main(["status"]) == 1
    assert "no run recorded" in capsys.readouterr().err
    run_factory("moved", [job("x", "1")], port=1)
    assert main(["status", "no-such-run"]) == 1
    err = capsys.readouterr().err
    assert "no run 'no-such-run'" in err and "newest: moved" in err

    assert main(["status", "moved"]) == 1
    assert "cannot reach local (" in capsys.readouterr().err

    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    run_factory("stranger", [job("x", "1")], key=str(other_key))
    assert main(["status", "stranger"]) == 1
    assert "authentication to local" in capsys.readouterr().err

    fake_host = tmp_path / "fake_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fake_host)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{local_cluster.port} {(fake_host.with_suffix('.pub')).read_text()}")
    run_factory("spoofed", [job("x", "1")], known_hosts=str(known))
    assert main(["status", "spoofed"]) == 1
    err = capsys.readouterr().err
    assert "has CHANGED" in err and "ssh-keygen -R" in err

    run_factory("unknown-key", [job("x", "1")], known_hosts=str(tmp_path / "empty"))
    assert main(["status", "unknown-key"]) == 1
    assert "is not in" in capsys.readouterr().err

    assert main(["cancel", "moved"]) == 1  # no terminal to confirm on, no --yes
    assert "--yes" in capsys.readouterr().err


class NoSlurm:
    """A login node without SLURM client commands (cannot be had on this machine, which has them)."""

    def run(self, argv, timeout=120.0):
        from pipeline.monitor.ssh import Result

        return Result(127, "", f"bash: {argv[0]}: command not found")


def test_a_host_without_sacct_and_squeue_is_named():
    from pipeline.errors import SnowpipeError
    from pipeline.monitor.jobstate import query

    record = RunRecord(run_id="r", host="login", address="login.example", remote_dir="/r", jobs=[job("x", "1")])
    with pytest.raises(SnowpipeError, match="neither sacct nor squeue works on login: is it a SLURM login node"):
        query(NoSlurm(), record)
