"""The embedded local cluster as a user meets it: up, ssh in, submit jobs (GPU ones too), sacct, down, up again."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.errors import SnowpipeError
from pipeline.localcluster import embedded
from pipeline.localcluster.commands import EXIT_STOPPED, add_cluster_parser
from pipeline.localcluster.embedded import ClusterInfo
from pipeline.localcluster.embedded_files import (
    ClusterPaths,
    render_slurm_conf,
    render_slurmdbd_conf,
    slurm_conf_accounting,
)
from tests.cluster_fixture import need_accounting

pytestmark = pytest.mark.cluster

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _pids() -> dict[str, int | None]:
    return embedded.status().pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="snowpipe")
    add_cluster_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _sbatch_over_ssh(info: ClusterInfo, *sbatch_args: str) -> str:
    done = subprocess.run(info.ssh_command(shlex.join(["sbatch", "--parsable", *sbatch_args])),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _wait_for_job(info: ClusterInfo, job_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=info.env(), capture_output=True,
                               text=True, timeout=15).stdout
        fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
        state = fields.get("JobState", state)
        if state in FINAL_STATES:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


def test_up_brings_the_node_to_idle_and_ssh_checks_host_keys(local_cluster: ClusterInfo, tmp_path: Path) -> None:
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %t"], env=local_cluster.env(), capture_output=True, text=True)
    partition, state = sinfo.stdout.split()
    assert partition == "local*" and state in {"idle", "mix", "alloc"}  # mix/alloc: someone else's jobs run

    assert subprocess.run(local_cluster.ssh_command("true"), timeout=15).returncode == 0
    assert local_cluster.known_hosts.read_text().startswith("[127.0.0.1]:2222 ssh-ed25519 AAAA")
    empty = tmp_path / "known_hosts"
    empty.touch()
    strict = [arg.replace(str(local_cluster.known_hosts), str(empty)) for arg in local_cluster.ssh_command("true")]
    refused = subprocess.run(strict, capture_output=True, text=True, timeout=15)
    assert refused.returncode != 0 and "Host key verification failed" in refused.stderr
    assert _cli("cluster", "status") == 0


def test_a_second_up_reports_the_running_cluster_and_starts_nothing(local_cluster: ClusterInfo) -> None:
    before = _pids()
    said: list[str] = []
    assert embedded.up(report=said.append) == local_cluster  # keeps the running cluster's accounting choice
    assert said == [f"cluster: already running ({embedded.cluster_dir()}); "
                    f"{embedded.accounting_line(local_cluster.accounting)}"]
    assert _pids() == before


def test_up_with_another_min_job_age_reconfigures_the_running_cluster(local_cluster: ClusterInfo) -> None:
    def min_job_age() -> str:
        shown = subprocess.run(["scontrol", "show", "config"], env=local_cluster.env(), capture_output=True,
                               text=True, timeout=15).stdout
        return next(line.split("=", 1)[1].strip() for line in shown.splitlines() if line.startswith("MinJobAge"))

    before = _pids()
    try:
        embedded.up(min_job_age=7, report=lambda line: None)
        assert min_job_age() == "7 sec"
    finally:
        embedded.up(report=lambda line: None)
    assert min_job_age() == "300 sec"
    assert _pids() == before


def test_a_batch_job_submitted_over_ssh_completes(local_cluster: ClusterInfo, tmp_path: Path) -> None:
    job_id = _sbatch_over_ssh(local_cluster, f"--output={tmp_path}/hostname-%j.out", "--wrap", "hostname")
    assert _wait_for_job(local_cluster, job_id) == "COMPLETED"
    assert (tmp_path / f"hostname-{job_id}.out").read_text().strip() == os.uname().nodename


def test_a_gpu_job_is_scheduled_and_sees_its_gpu(local_cluster: ClusterInfo, tmp_path: Path) -> None:
    job_id = _sbatch_over_ssh(local_cluster, "--gres=gpu:1", f"--output={tmp_path}/gpu-%j.out",
                              "--wrap", "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
    assert _wait_for_job(local_cluster, job_id) == "COMPLETED"
    assert (tmp_path / f"gpu-{job_id}.out").read_text().strip() == "CUDA_VISIBLE_DEVICES=0"


def test_a_second_cluster_on_the_same_ports_is_refused(local_cluster: ClusterInfo, tmp_path: Path) -> None:
    other = ClusterPaths(tmp_path / "other")
    with pytest.raises(SnowpipeError, match="port 127.0.0.1:3307 is taken"):  # accounting by default: MariaDB first
        embedded.up(paths=other, report=lambda line: None)
    assert not embedded.status(other).any_running
    with pytest.raises(SnowpipeError, match="port 0.0.0.0:6817 is taken"):
        embedded.up(paths=other, accounting=False, report=lambda line: None)
    assert not embedded.status(other).any_running


def test_accounting_config_points_slurm_at_our_slurmdbd_and_munge_socket(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path)
    on = render_slurm_conf(paths, "n1", 2, 1024, accounting=True)
    off = render_slurm_conf(paths, "n1", 2, 1024)
    assert slurm_conf_accounting(on) and not slurm_conf_accounting(off)
    assert f"AccountingStoragePass={paths.munge_socket}" in on.splitlines()  # clients' munge socket for slurmdbd
    assert "AccountingStorageTRES=gres/gpu" in on.splitlines()  # sacct's AllocTRES names the GPUs: GPU-hours
    assert "AccountingStorageType=accounting_storage/none" in off.splitlines()
    dbd = render_slurmdbd_conf(paths, "secret").splitlines()
    assert {"StoragePass=secret", "StorageHost=127.0.0.1", "StoragePort=3307", "DbdPort=6819",
            f"AuthInfo=socket={paths.munge_socket}", f"PidFile={paths.pid('slurmdbd')}"} <= set(dbd)


def _sacct(info: ClusterInfo, *job_ids: str, timeout: float = 20) -> dict[str, str]:
    """`JobID|State|ExitCode` per job once sacct reports every job finished (slurmctld sends records async)."""
    deadline = time.monotonic() + timeout
    rows: dict[str, str] = {}
    while time.monotonic() < deadline:
        done = subprocess.run(["sacct", "-j", ",".join(job_ids), "--noheader", "--parsable2", "-X",
                               "--format=JobID,State,ExitCode"], env=info.env(), capture_output=True, text=True,
                              timeout=15)
        assert done.returncode == 0, done.stderr
        rows = {line.split("|")[0]: line for line in done.stdout.split()}
        if all(job_id in rows and rows[job_id].split("|")[1] in FINAL_STATES for job_id in job_ids):
            return rows
        time.sleep(0.3)
    raise AssertionError(f"sacct did not report {job_ids} finished within {timeout} s: {rows}")


def test_sacct_reports_finished_jobs_with_their_state_and_exit_code(local_cluster: ClusterInfo,
                                                                    tmp_path: Path) -> None:
    need_accounting(local_cluster)
    ok = _sbatch_over_ssh(local_cluster, f"--output={tmp_path}/%j.out", "--wrap", "true")
    failed = _sbatch_over_ssh(local_cluster, f"--output={tmp_path}/%j.out", "--wrap", "false")
    assert _wait_for_job(local_cluster, ok) == "COMPLETED"
    assert _wait_for_job(local_cluster, failed) == "FAILED"
    rows = _sacct(local_cluster, ok, failed)
    assert rows[ok] == f"{ok}|COMPLETED|0:0"
    assert rows[failed] == f"{failed}|FAILED|1:0"

    over_ssh = subprocess.run(local_cluster.ssh_command(f"sacct -j {ok} --noheader --parsable2 "
                                                        "--format=JobID,State,ExitCode"),
                              capture_output=True, text=True, timeout=30)
    assert over_ssh.returncode == 0 and over_ssh.stdout.split()[0] == f"{ok}|COMPLETED|0:0", over_ssh.stderr


def test_status_reports_accounting(local_cluster: ClusterInfo, capsys: pytest.CaptureFixture[str]) -> None:
    state = embedded.status()
    assert state.accounting == local_cluster.accounting == embedded.accounting_enabled()
    assert ("slurmdbd" in state.pids and "mariadbd" in state.pids) == local_cluster.accounting
    assert _cli("cluster", "status") == 0
    shown = capsys.readouterr().out
    assert ("accounting: on (sacct works)" if local_cluster.accounting else "accounting: off") in shown


def test_down_stops_the_daemons_and_a_later_up_works_again(local_cluster: ClusterInfo) -> None:
    before = _pids()
    running = [daemon for daemon in reversed(embedded.ALL_DAEMONS) if before.get(daemon)]
    assert embedded.down(report=lambda line: None) == running
    assert not any(_alive(pid) for pid in before.values() if pid)
    assert not any(embedded.ClusterPaths.default().pid(daemon).exists() for daemon in embedded.ALL_DAEMONS)
    assert _cli("cluster", "status") == EXIT_STOPPED
    assert embedded.down(report=lambda line: None) == []
    assert embedded.accounting_enabled() == local_cluster.accounting  # down keeps the choice

    if not local_cluster.accounting:
        info = embedded.up(report=lambda line: None)
        assert embedded.is_up() and subprocess.run(info.ssh_command("true"), timeout=15).returncode == 0
        assert set(_pids().values()).isdisjoint(before.values())
        return
    # from stopped without accounting, then switching it on while the cluster runs (what `up --accounting` does)
    info = embedded.up(accounting=False, report=lambda line: None)
    assert not info.accounting and not embedded.status().accounting and embedded.is_up()
    assert set(_pids()) == set(embedded.DAEMONS) and set(_pids().values()).isdisjoint(before.values())
    plain = _pids()
    said: list[str] = []
    info = embedded.up(accounting=True, report=said.append)
    assert info == local_cluster and embedded.is_up()
    assert any("turning accounting on: restarting slurmctld and slurmd" in line for line in said), said
    after = _pids()
    assert after["sshd"] == plain["sshd"] and after["munged"] == plain["munged"]
    assert after["slurmctld"] != plain["slurmctld"] and after["slurmdbd"] and after["mariadbd"]
    assert subprocess.run(info.ssh_command("sacct --noheader -X -S now-1minute"), timeout=30).returncode == 0


def test_accounting_is_on_unless_asked_off(tmp_path: Path) -> None:
    """`snowpipe cluster up` (and so `make demo`) runs slurmdbd: a finished run leaves what `snowpipe report` reads;
    `--no-accounting` starts quicker without it."""
    paths = ClusterPaths(tmp_path)
    assert embedded.accounting_enabled(paths)  # a new cluster
    paths.accounting_choice.write_text("off\n")
    assert not embedded.accounting_enabled(paths)
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["cluster", "up"]).accounting is True
    assert build_parser().parse_args(["cluster", "up", "--no-accounting"]).accounting is False
