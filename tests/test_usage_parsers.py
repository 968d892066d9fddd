"""What `snowpipe report` and `snowpipe probe` read from sacct, scontrol, sinfo and sacctmgr, told with their real
output: the files under tests/fixtures/slurm/ were recorded from the embedded cluster's SLURM 22.05
(`record_costs.py` there says how), except the `*_documented.txt` ones, written from the formats later SLURM
versions document. The report's sums and advice, the probe's facts, the plan's check against them and the stages'
busy timer are told here too. No cluster needed."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.cluster_facts import fact_or_default, facts_path, load_facts, save_facts, slurm_megabytes, slurm_seconds
from pipeline.contract.run_record import RunRecord
from pipeline.errors import SnowpipeError
from pipeline.model.busy import BusyTimer, NvidiaSmiSampler, busy_file, write_busy
from pipeline.monitor import probe_parsers, report
from pipeline.monitor.probe import probe
from pipeline.monitor.ssh import Result
from pipeline.monitor.usage_parsers import cpu_seconds, gpu_count, parse_usage, size_bytes, usage_command
from pipeline.submit.cluster_check import plan_problems, requested_gpus

FIXTURES = Path(__file__).parent / "fixtures" / "slurm" / "costs"


def capture(name: str) -> tuple[str, dict[str, str]]:
    """A fixture's command output (its `#` lines dropped) and the jobs it shows, by name."""
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    jobs = next((dict(pair.split("=") for pair in line.split()[2:]) for line in lines if line.startswith("# jobs:")),
                {})
    return "".join(line for line in lines if not line.startswith("#")), jobs


# ------------------------------------------------------------------------------------------------ sacct usage


def test_a_recorded_run_gives_cpu_time_peak_memory_gpus_and_waits_per_task():
    text, jobs = capture("sacct_usage.txt")
    usages = parse_usage(text)
    by_id = {}
    for usage in usages:
        by_id.setdefault(usage.job_id, []).append(usage)
    (burn,) = by_id[jobs["burn"]]
    assert burn.cpus == 1 and burn.elapsed_s >= 4 and 3.0 < burn.cpu_used_s <= burn.cpu_alloc_s
    assert burn.max_rss_bytes is not None and 150 * 2**20 < burn.max_rss_bytes < 300 * 2**20  # its .batch step's
    assert burn.requested_mem_bytes == 400 * 2**20 and burn.time_limit_s == 300
    (gpu,) = by_id[jobs["gpu"]]
    assert gpu.gpus == 1 and gpu.time_limit_s == 120 and burn.gpus == 0
    tasks = [usage for usage in usages if usage.job == jobs["arr"]]
    assert [(u.job_id, u.task) for u in tasks] == [(f"{jobs['arr']}_0", 0), (f"{jobs['arr']}_1", 1)]
    assert all(u.time_limit_s is None and u.wait_s is not None and u.wait_s >= 0 for u in tasks)  # no limit set
    starts = by_id[jobs["rq"]]  # requeued: each start paid for, the last one's state is the task's
    assert [u.state for u in starts] == ["REQUEUED", "CANCELLED"]
    assert starts[0].wait_s is not None and starts[1].wait_s is None  # cancelled before it started again
    assert usage_command(["7", "8"])[:4] == ["sacct", "--jobs", "7,8", "--duplicates"]


def test_later_slurm_forms_typed_gpus_partition_limits_days_and_per_cpu_memory():
    text, jobs = capture("sacct_usage_documented.txt")
    usages = {u.job_id: u for u in parse_usage(text)}
    train = usages[jobs["train"]]
    assert train.gpus == 2  # gres/gpu=2 and gres/gpu:a100=2 are the same two GPUs
    assert train.cpu_used_s == 26 * 3600 and train.max_rss_bytes == 31457280 * 1024 and train.elapsed_s == 80000
    assert train.wait_s == 600 and train.time_limit_s == 86400
    assert usages[f"{jobs['infer']}_0"].time_limit_s is None  # Partition_Limit
    assert usages[f"{jobs['infer']}_0"].max_rss_bytes == int(3.5 * 2**30)
    assert not [u for u in usages if "[" in u]  # the pending rest of the array used nothing
    assert usages[jobs["old"]].requested_mem_bytes == 4 * 4000 * 2**20  # 4000Mc: per CPU, 4 CPUs
    assert (gpu_count("gres/gpu:a100=1,gres/gpu:v100=2"), gpu_count("cpu=1,mem=1G"), gpu_count("")) == (3, 0, 0)
    assert (cpu_seconds("00:04.085"), cpu_seconds("01:02:03")) == (4.085, 3723)
    assert (size_bytes(""), size_bytes("0"), size_bytes("1.5M")) == (None, 0, int(1.5 * 2**20))


def record_of(jobs: dict[str, str], arrays: tuple[str, ...] = ()) -> RunRecord:
    stages = {"burn": ["decode"], "gpu": ["train"], "arr": ["infer"], "rq": ["test"], "train": ["train"],
              "infer": ["infer"], "annotate": ["annotate"], "old": ["dataset"]}
    return RunRecord(run_id="r1", host="login", remote_dir="/scratch/runs/r1", jobs=[
        {"name": name, "id": job_id, "stages": stages[name], "array": "0-9" if name in arrays else None}
        for name, job_id in jobs.items()])


def test_the_report_adds_up_a_run_per_stage_and_its_totals_match_the_tasks():
    text, jobs = capture("sacct_usage.txt")
    usages = parse_usage(text)
    busy = [{"stage": "train", "busy_s": 1.0, "wall_s": 4.0, "method": "perf_counter"}]
    stages = [cost.as_dict() for cost in report.group(record_of(jobs, ("arr",)), usages, busy)]
    assert [s["name"] for s in stages] == ["burn", "gpu", "arr", "rq"]
    by_name = {s["name"]: s for s in stages}
    assert by_name["arr"]["tasks"] == 2 and by_name["arr"]["states"] == {"COMPLETED": 2}
    assert by_name["rq"]["tasks"] == 1 and by_name["rq"]["starts"] == 2 and by_name["rq"]["states"] == {"CANCELLED": 1}
    assert by_name["gpu"]["gpu_hours"] == pytest.approx(by_name["gpu"]["elapsed_s"]["sum"] / 3600, rel=1e-3)
    assert by_name["gpu"]["gpu_busy"] == 0.25 and by_name["burn"]["gpu_busy"] is None
    assert 0.5 < by_name["burn"]["cpu_efficiency"] <= 1
    total = report.totals(stages)
    assert total["cpu_hours"] == pytest.approx(sum(u.cpu_alloc_s for u in usages) / 3600, rel=1e-3)
    assert total["gpu_hours"] == pytest.approx(sum(u.gpus * u.elapsed_s for u in usages) / 3600, rel=1e-3)
    for key in ("name", "tasks", "cpu_hours", "gpu_hours", "cpu_efficiency", "max_rss_bytes", "requested_mem_bytes",
                "gpu_busy"):
        assert all(key in s for s in stages), key


def test_the_chunks_of_a_stage_past_max_array_size_are_one_stage_in_the_report():
    text, jobs = capture("sacct_usage.txt")
    record = RunRecord(run_id="r1", host="login", remote_dir="/r", jobs=[
        {"name": "annotate.1", "id": jobs["arr"], "array": "0-1", "stages": ["annotate"], "chunk_of": "annotate"},
        {"name": "annotate.2", "id": jobs["burn"], "array": "0", "stages": ["annotate"], "chunk_of": "annotate"}])
    (stage,) = [cost.as_dict() for cost in report.group(record, parse_usage(text), [])]
    assert stage["name"] == "annotate" and stage["tasks"] == 3 and stage["states"] == {"COMPLETED": 3}


def test_advice_names_the_job_spec_key_for_memory_cpus_gpu_and_time():
    text, jobs = capture("sacct_usage_documented.txt")
    busy = [{"stage": "infer", "busy_s": 300.0, "wall_s": 1800.0}]
    stages = [cost.as_dict() for cost in report.group(record_of(jobs, ("infer",)), parse_usage(text), busy)]
    lines = report.advice(stages)
    assert any(line.startswith("train: asked 64.0 GiB of memory, its largest task used 30.0 GiB") and
               "`memory: 45G` in jobs/train.yml" in line for line in lines), lines
    assert any(line.startswith("annotate: CPU efficiency") and "`cpus`" in line for line in lines), lines
    assert any(line.startswith("infer: the GPU was busy 17% of the time") and "`scenes_per_task`" in line
               for line in lines), lines
    assert "annotate: a task used 100% of its time limit (2:00:00): raise `time` in jobs/annotate.yml" in lines
    assert "train: a task used 93% of its time limit (24:00:00): raise `time` in jobs/train.yml" in lines
    assert not [line for line in lines if line.startswith("old:") and "memory" in line]  # asked what it used


class Remote:
    """A login node answering each command with a fixture (or a failure)."""

    def __init__(self, answers: dict[str, Result]) -> None:
        self.answers, self.asked = answers, []

    def run(self, argv, timeout=120.0):
        self.asked.append(argv)
        for word, result in self.answers.items():
            if word in argv[:2] or word == " ".join(argv[:3]):
                return result
        return Result(127, "", f"bash: {argv[0]}: command not found")


def test_without_accounting_the_report_shows_the_stages_timings_and_says_what_it_cannot_know():
    busy = json.dumps({"stage": "infer", "busy_s": 5.0, "wall_s": 20.0}) + "\n" + \
        json.dumps({"stage": "infer", "busy_s": 5.0, "wall_s": 20.0})
    remote = Remote({"sacct": Result(1, "", "sacct: error: Slurm accounting storage is disabled"),
                     "sh": Result(0, busy, "")})
    built = report.build(record_of({"arr": "74"}, ("arr",)), remote)
    assert built["source"] == "stage timings" and built["advice"] == []
    assert "Slurm accounting storage is disabled" in built["unknown"] and "GPU-hours" in built["unknown"]
    (stage,) = built["stages"]
    assert stage["tasks"] == 2 and stage["gpu_busy"] == 0.25 and stage["cpu_hours"] is None
    assert [argv[0] for argv in remote.asked] == ["sacct", "sh"]  # one sacct, one read of the busy files
    assert report.table(built).row_count == 2


# ------------------------------------------------------------------------------------------------ probe


def probed(sinfo: str = "sinfo_partitions.txt", qos: str = "sacctmgr_qos.txt",
           assoc: str = "sacctmgr_assoc.txt", refused: Result | None = None, host: str = "local") -> dict:
    """`probe` against a login node that answers with these fixtures (sacctmgr with `refused`, when given)."""

    def run(argv, timeout=120.0):
        if argv[0] == "sacctmgr":
            return refused or Result(0, capture(qos if "qos" in argv else assoc)[0], "")
        answers = {"scontrol": capture("scontrol_config.txt")[0], "sinfo": capture(sinfo)[0], "id": "alice\n"}
        return Result(0, answers[argv[0]], "")

    remote = Remote({})
    remote.run = run
    return probe(remote, host)


def test_the_embedded_clusters_config_partitions_and_open_accounting():
    facts = probed()
    assert (facts["max_array_size"], facts["max_job_count"], facts["min_job_age_s"]) == (1001, 10000, 300)
    assert facts["accounting"] is True and facts["slurm_version"].startswith("22.05")
    (partition,) = facts["partitions"]
    assert partition["name"] == "local" and partition["default"] and partition["time_limit_s"] is None
    assert partition["gpus"] == {"": 2} and partition["cpus_per_node"] >= 1 and partition["memory_mb_per_node"] > 0
    assert facts["qos"][0]["name"] == "normal" and facts["max_submit_jobs"] is None and facts["partial"] == []


def test_later_slurm_forms_typed_gpus_unlike_nodes_and_submit_limits():
    partitions = {p.name: p for p in probe_parsers.parse_sinfo(capture("sinfo_documented.txt")[0])}
    assert partitions["normal"].default and partitions["normal"].time_limit_s == 4 * 3600
    gpu = partitions["gpu"]
    assert (gpu.nodes, gpu.cpus_per_node, gpu.memory_mb_per_node, gpu.gpus) == (16, 128, 1024000, {"a100": 8})
    assert partitions["v100"].gpus == {"v100": 2} and partitions["v100"].time_limit_s == 5 * 86400
    assert not partitions["bigmem"].available and partitions["debug"].time_limit_s == 1800
    limits = probe_parsers.parse_qos(capture("sacctmgr_qos_documented.txt")[0])
    assert [(q.name, q.max_submit_jobs, q.max_wall_s) for q in limits] == [("normal", 5000, 86400),
                                                                           ("long", 100, 7 * 86400)]
    (assoc,) = probe_parsers.parse_assoc(capture("sacctmgr_assoc_documented.txt")[0])
    assert assoc.qos == ("long", "normal") and assoc.max_submit_jobs == 2000


def test_the_lowest_submit_limit_wins_and_a_closed_sacctmgr_gives_partial_facts():
    facts = probed("sinfo_documented.txt", "sacctmgr_qos_documented.txt", "sacctmgr_assoc_documented.txt")
    assert facts["max_submit_jobs"] == 100  # QOS long, which alice may use, under her own 2000
    closed = probed("sinfo_documented.txt", refused=Result(
        1, "", "sacctmgr: error: Problem talking to the database: Access/permission denied"))
    assert closed["max_submit_jobs"] is None and closed["qos"] is None
    assert closed["partial"] == ["sacctmgr refused (sacctmgr: error: Problem talking to the database: "
                                 "Access/permission denied): QOS and association limits unknown"]
    assert closed["partitions"] and closed["max_array_size"] == 1001  # the rest is known


def test_a_host_without_scontrol_is_named():
    with pytest.raises(SnowpipeError, match="`scontrol show config` fails on login: bash: scontrol: command not found"):
        probe(Remote({}), "login")


# ------------------------------------------------------------------------------------------------ facts and the plan


def test_facts_are_kept_per_host_and_the_inventory_wins_over_them(tmp_path):
    assert load_facts(tmp_path, "euler") is None
    saved = save_facts(tmp_path, "euler", {"max_array_size": 5001, "max_submit_jobs": None})
    assert saved == facts_path(tmp_path, "euler") == tmp_path / ".snowpipe/cluster-facts/euler.json"
    facts = load_facts(tmp_path, "euler")
    assert facts["max_array_size"] == 5001 and facts["host"] == "euler"
    assert fact_or_default(2000, facts, "max_array_size", 1001) == 2000  # inventory
    assert fact_or_default("", facts, "max_array_size", 1001) == 5001  # probed
    assert fact_or_default(None, facts, "max_submit_jobs", None) is None and fact_or_default(None, None, "x", 1) == 1
    saved.write_text("{not json")
    assert load_facts(tmp_path, "euler") is None  # unreadable: planned as before any probe
    assert (slurm_seconds("1-00:00:00"), slurm_seconds("30"), slurm_seconds("4:00:00"), slurm_seconds("infinite")) == \
        (86400, 1800, 14400, None)
    assert (slurm_megabytes("16G"), slurm_megabytes("4000M"), slurm_megabytes("1024"), slurm_megabytes("x")) == \
        (16384, 4000, 1024, None)


@dataclass
class Planned:
    """What the check reads of a planned job: its name and #SBATCH options."""

    name: str
    sbatch: dict


def planned(name: str, **sbatch) -> Planned:
    return Planned(name, {"time": "01:00:00", **sbatch})


def test_a_plan_asking_what_the_cluster_lacks_is_refused_naming_job_key_and_offer():
    partitions = [p.as_dict() for p in probe_parsers.parse_sinfo(capture("sinfo_documented.txt")[0])]
    facts = {"host": "euler", "partitions": partitions}
    jobs = [planned("decode", mem="4G"), planned("train", partition="gpu", gres="gpu:h100:1", time="2-00:00:00"),
            planned("infer", partition="gpux", gres="gpu:1"), planned("test", partition="v100", gpus="3"),
            planned("dataset", mem="300G"), planned("annotate", partition="gpu", gres="gpu:a100:4,gpumem:20g")]
    problems = plan_problems(jobs, facts)
    assert problems == [
        "job train: GPU type 'h100' (key `gpu_type`) is not in partition gpu of euler; it offers 8 x a100 per node",
        "job train: time 2-00:00:00 (key `time`) exceeds the 1-00:00:00 partition gpu of euler allows",
        "job infer: partition 'gpux' (key `partition`) does not exist on euler; it offers: normal (default), gpu, "
        "v100, bigmem, debug",
        "job test: 3 GPUs (key `gpus`) but a node of partition v100 of euler has at most 2 x v100",
        "job dataset: memory 300G (key `memory`) exceeds the 256000 MB a node of partition normal of euler has",
    ]
    assert plan_problems(jobs, None) == []  # never probed: sbatch decides, as before
    assert requested_gpus({"gpus": "a100:2"}) == ("a100", 2) and requested_gpus({"gres": "gpumem:20g"}) == ("", 0)


# ------------------------------------------------------------------------------------------------ busy timer


def test_the_busy_timer_sets_model_time_against_wall_time_and_writes_one_file_per_task(tmp_path, monkeypatch):
    timer = BusyTimer(torch.device("cpu"))
    x = torch.randn(256, 256)
    with timer.measure():
        for _ in range(20):
            x = (x @ x).tanh()
    summary = timer.summary("infer")
    assert summary["method"] == "perf_counter" and summary["spans"] == 1
    assert 0 < summary["busy_s"] <= summary["wall_s"] and 0 < summary["busy_fraction"] <= 1
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    written = write_busy(tmp_path, "infer", timer)
    assert written == tmp_path / "busy/infer-task3.json" and json.loads(written.read_text())["stage"] == "infer"
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert busy_file(tmp_path, "train") == tmp_path / "busy/train.json"
    assert write_busy(tmp_path, "train", BusyTimer(torch.device("cpu"))) is None  # the model never ran: no file


def test_nvidia_smi_samples_are_a_second_opinion_on_gpu_busy_where_it_exists(tmp_path, monkeypatch):
    """No GPU here: a stand-in `nvidia-smi` on PATH prints what the real one prints with -lms (one utilization a
    line, "[N/A]" where it has none). The sampler runs it for the task's device and averages; the report weighs
    the tasks by their samples. Without nvidia-smi nothing runs and nothing is claimed."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "for u in 80 '[N/A]' 60 100; do echo \"$u\"; done\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    sampler = NvidiaSmiSampler(1, period_ms=1000)
    deadline = time.monotonic() + 60
    while len(sampler.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sampler.stop() == (0.8, 3) and sampler.process is not None and sampler.process.poll() is not None
    assert (fake.parent / "args").read_text().split() == [
        "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "1", "-lms", "1000"]
    busy = [{"stage": "infer", "nvidia_smi_utilization": 0.8, "nvidia_smi_samples": 3},
            {"stage": "infer", "nvidia_smi_utilization": 0.4, "nvidia_smi_samples": 1},
            {"stage": "infer", "nvidia_smi_utilization": None, "nvidia_smi_samples": 0}]
    assert report._smi_mean(busy) == 0.7
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert NvidiaSmiSampler(0).stop() == (None, 0)
