"""A season over two tiles, planned as a user plans it before submitting: arrays split within the cluster's
MaxArraySize (chunks `{job}.{k}`) with every scene in exactly one task of each array stage, dependencies that keep
their meaning across chunks, the cost of every job and of the run, scenes per task from the cost model,
MaxSubmitJobs, and `-e max_gpu_hours=N` refusing a run before anything is sent (issue 22, items 3-4)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.contract.plan import Plan
from pipeline.contract.run_record import Connection, record_of_submission
from pipeline.submit import cost
from tests.playbooks import DRY_RUNS, playbook

ARRAY_STAGES = ("decode", "annotate", "infer")
SCRATCH = {"snowpipe_remote_root": "/scratch/x"}


@pytest.fixture(scope="module")
def season(tmp_path_factory) -> Path:
    """200 sensing times on each of two tiles: 400 scenes (64 px, quick to write)."""
    out = tmp_path_factory.mktemp("season") / "D"
    assert main(["demo-data", str(out), "--tiles", "32TNS,32TMS", "--scenes", "200", "--size", "64"]) == 0
    return out / "pipeline-config.yml"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Two tiles x 5 scenes, for what goes through ansible-playbook."""
    out = tmp_path_factory.mktemp("small") / "D"
    assert main(["demo-data", str(out), "--tiles", "32TNS,32TMS", "--scenes", "5", "--size", "64"]) == 0
    return out / "pipeline-config.yml"


def plan_json(config: Path, capsys, **variables) -> dict:
    assert main(["plan", str(config), "--json", "--target-vars", json.dumps({**SCRATCH, **variables})]) == 0
    return json.loads(capsys.readouterr().out)


def stage_jobs(plan: dict, stage: str) -> list[dict]:
    return [job for job in plan["jobs"] if (job["chunk_of"] or job["name"]) == stage]


def scenes_of(jobs: list[dict]) -> list[str]:
    return [scene for job in jobs for task in job["scene_ids"] for scene in task.split(",")]


@pytest.fixture(scope="module")
def season_plan(season) -> dict:
    """The plan of the Done-when story: `snowpipe plan --json` with MaxArraySize 100 from the inventory."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["plan", str(season), "--json", "--target-vars",
                     json.dumps({**SCRATCH, "snowpipe_max_array_size": 100})]) == 0
    return json.loads(printed.getvalue())


def test_a_season_of_two_tiles_is_planned_in_arrays_of_at_most_100_tasks_covering_every_scene_once(
        season, season_plan, capsys):
    plan = season_plan
    products = [path.name.split("_") for path in (season.parent / "extracted_data").glob("*.SAFE")]
    ids = {f"{parts[5][1:]}_{parts[2]}" for parts in products}  # S2A_MSIL1C_{time}_N0400_R065_T{tile}_...
    assert len(ids) == 400 and {scene[:5] for scene in ids} == {"32TNS", "32TMS"}
    assert all(job["array_size"] <= 100 for job in plan["jobs"])
    for stage in ARRAY_STAGES:
        chunks = stage_jobs(plan, stage)
        assert [job["name"] for job in chunks] == [f"{stage}.{k}" for k in range(1, 5)]
        scenes = scenes_of(chunks)
        assert sorted(scenes) == sorted(ids), stage  # each of the 400 scenes in exactly one task
        assert all(job["array"] == f"0-{job['array_size'] - 1}" for job in chunks)
    assert plan["estimate"]["cpu_hours"] > 0 and plan["estimate"]["gpu_hours"] > 0
    assert plan["estimate"]["sync_bytes"] == sum(item["bytes"] for item in plan["sync"]) > 0
    assert plan["estimate"]["decoded_bytes"] == plan["decoded_bytes"] > 0
    for job in plan["jobs"]:
        estimate = job["estimate"]
        assert estimate["tasks"] == max(job["array_size"], 1) and estimate["minutes_per_task"] > 0
        assert estimate["cpu_hours"] > 0 and (estimate["gpu_hours"] > 0) == (job["name"].split(".")[0] in
                                                                             ("train", "infer"))

    assert main(["plan", str(season), "--target-vars", json.dumps({**SCRATCH, "snowpipe_max_array_size": 100})]) == 0
    table = capsys.readouterr().out
    assert "GPU-hours" in table and "CPU-hours" in table and "infer.4" in table
    assert re.search(r"estimate: [\d.]+ CPU-hours, [\d.]+ GPU-hours", table)


def test_chunks_wait_for_what_their_stage_waited_for(season_plan):
    plan = Plan.model_validate(season_plan)
    names = [job.name for job in plan.jobs]
    for k in range(1, 5):
        annotate, infer = plan.job(f"annotate.{k}"), plan.job(f"infer.{k}")
        # annotate task i after decode task i of its own decode chunk: the same scenes, task by task
        assert annotate.after == annotate.after_each == [f"decode.{k}"]
        assert annotate.scene_ids == plan.job(f"decode.{k}").scene_ids and annotate.chunk_of == "annotate"
        # infer after the model and after the decode chunk holding its scenes
        assert infer.after == ["train", f"decode.{k}"] and infer.after_each == []
        assert f"afterok:$train:$decode_{k} " in infer.submit_display
        assert names.index(infer.name) > names.index(f"decode.{k}")
    assert plan.job("dataset").after == [f"annotate.{k}" for k in range(1, 5)]
    assert plan.job("test").after == [f"infer.{k}" for k in range(1, 5)]
    assert plan.job("train").chunk_of is None and plan.job("train").after == ["dataset"]
    # the run record keeps which chunks are one stage job (snowpipe status, logs, fetch and cancel read it)
    record = record_of_submission(plan, {name: str(1000 + i) for i, name in enumerate(names)}, Connection(host="x"))
    assert {job.name: job.chunk_of for job in record.jobs}["decode.3"] == "decode"
    assert {job.name: job.chunk_of for job in record.jobs}["dataset"] is None


def test_scenes_per_task_0_fills_half_the_time_limit_by_the_cost_model(season, capsys):
    plan = plan_json(season, capsys, snowpipe_job_overrides={"infer": {"scenes_per_task": 0, "time": "00:02:00"}})
    infer = stage_jobs(plan, "infer")
    (job,) = infer  # 1001 tasks fit one array
    per_task = job["estimate"]["scenes_per_task"]
    assert per_task > 1 and job["scenes_per_task"] == per_task
    assert job["estimate"]["minutes_per_task"] <= 1.0  # half of 2 minutes
    assert job["array_size"] == math.ceil(400 / per_task) and len(scenes_of(infer)) == 400
    assert any("scenes_per_task: 0" in note for note in plan["estimate"]["warnings"])
    # one scene more would pass half the limit
    megapixels = 64 * 64 / 1e6
    one_more = cost.task_minutes(["infer"], load_config(season), {"infer": cost.Work([megapixels] * (per_task + 1))},
                                 cpus=4, gpus=1)
    assert one_more > 1.0
    assert [j["scenes_per_task"] for j in stage_jobs(plan, "annotate")] == [1]  # other jobs keep theirs


def test_a_task_estimated_past_its_time_limit_is_named(season, capsys):
    plan = plan_json(season, capsys, snowpipe_job_overrides={"infer": {"scenes_per_task": 50, "time": "00:01:00"}})
    (warning,) = [w for w in plan["estimate"]["warnings"] if "past its time limit" in w]
    assert warning.startswith("job infer: a task is estimated at") and "lower scenes_per_task" in warning


def test_a_run_past_max_submit_jobs_gets_more_scenes_per_task_or_is_told_what_to_change(season, capsys):
    plan = plan_json(season, capsys, snowpipe_max_submit_jobs=300)
    tasks = sum(max(job["array_size"], 1) for job in plan["jobs"])
    assert tasks <= 300 and plan["max_submit_jobs"] == 300
    per_task = {job["name"]: job["scenes_per_task"] for job in plan["jobs"] if job["array_size"]}
    assert len(set(per_task.values())) == 1 and per_task["decode"] > 1  # raised together: decode and annotate align
    assert stage_jobs(plan, "annotate")[0]["after_each"] == ["decode"]
    assert any("MaxSubmitJobs 300" in note for note in plan["estimate"]["warnings"])
    for stage in ARRAY_STAGES:
        assert len(scenes_of(stage_jobs(plan, stage))) == 400

    # so few jobs allowed that a task would pass its time limit: refused before anything is sent, naming the fix
    variables = {**SCRATCH, "snowpipe_max_submit_jobs": 9,
                 "snowpipe_job_overrides": {"infer": {"time": "00:01:00"}}}
    assert main(["plan", str(season), "--json", "--target-vars", json.dumps(variables)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MaxSubmitJobs 9" in err and "job infer" in err and "raise its `time:`" in err
    # fewer jobs allowed than the run has jobs at all
    assert main(["plan", str(season), "--json", "--target-vars",
                 json.dumps({**SCRATCH, "snowpipe_max_submit_jobs": 5})]) == 2
    assert "above MaxSubmitJobs 5" in capsys.readouterr().err


def test_a_chunked_dry_run_renders_every_chunk_and_submits_them_in_order(small):
    run_id = "chunks-dry"
    shutil.rmtree(DRY_RUNS / run_id, ignore_errors=True)
    result = playbook("-e", f"config={small}", "-e", f"run_id={run_id}", "-e", "dry_run=true",
                      "-e", "snowpipe_max_array_size=4", "-e", "max_gpu_hours=100")
    assert result.returncode == 0, result.stdout[-3000:]
    scripts = sorted(path.stem for path in (DRY_RUNS / run_id / "jobs").glob("*.sbatch"))
    assert scripts == sorted([*(f"{stage}.{k}" for stage in ARRAY_STAGES for k in (1, 2, 3)),
                              "dataset", "train", "test"])
    decode_3 = (DRY_RUNS / run_id / "jobs" / "decode.3.sbatch").read_text()
    assert "#SBATCH --array=0-1%16" in decode_3 and "#SBATCH --job-name=decode.3" in decode_3
    assert "annotate_2=$(sbatch --parsable --dependency=aftercorr:$decode_2 --kill-on-invalid-dep=yes" in result.stdout
    assert "dataset=$(sbatch --parsable --dependency=afterok:$annotate_1:$annotate_2:$annotate_3 " in result.stdout
    assert re.search(r"estimated [\d.]+ CPU-hours and [\d.]+ GPU-hours", result.stdout)


def test_max_gpu_hours_refuses_a_run_above_it_before_anything_is_sent(small):
    run_id = "over-budget"
    shutil.rmtree(DRY_RUNS / run_id, ignore_errors=True)
    result = playbook("-e", f"config={small}", "-e", f"run_id={run_id}", "-e", "dry_run=true",
                      "-e", "max_gpu_hours=0.001")
    assert result.returncode != 0
    (fatal,) = [line for line in result.stdout.splitlines() if line.startswith("fatal:")]
    message = json.loads(fatal.split("=> ", 1)[1])["msg"]  # one plain line, as the user reads it
    assert re.fullmatch(r"run over-budget is estimated at [\d.]+ GPU-hours, above max_gpu_hours 0.001 \(most in job "
                        r"\w+: [\d.]+\); nothing was sent\. .*", message), message
    assert "Traceback" not in result.stdout
    assert not (DRY_RUNS / run_id).exists()  # neither rendered nor listed for sync


def test_the_plan_learns_a_stages_minutes_from_a_finished_run_on_the_same_cluster(small, capsys, monkeypatch,
                                                                                  tmp_path):
    """Issue 25, item 3: `snowpipe report` of a finished run keeps the plan's estimate and the measured minutes
    of each stage whose tasks all COMPLETED; the next plan for that host scales the cost model by their ratio
    and names the run, and a plan for another host keeps the model."""
    from pipeline.monitor.report import group
    from pipeline.monitor.usage_parsers import Usage

    monkeypatch.setenv("SNOWPIPE_RUNS_DIR", str(tmp_path / "runs"))
    before = plan_json(small, capsys, snowpipe_max_array_size=4)
    assert {job["estimate"]["source"] for job in before["jobs"]} == {"cost model"}
    ids = {job["name"]: str(100 + i) for i, job in enumerate(before["jobs"])}
    record = record_of_submission(Plan.model_validate(before), ids, Connection(host=before["host"]))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{record.run_id}.json").write_text(record.to_json())

    def usage(job_id: str, task: int, state: str, minutes: float) -> Usage:
        return Usage(f"{job_id}_{task}", job_id, task, "annotate", state, round(minutes * 60), 1, 3600, 1, 1.0,
                     round(minutes * 60), 0, None, None)

    estimated = {job.name: job.estimated_minutes for job in record.jobs}
    annotate = [job for job in record.jobs if job.chunk_of == "annotate"]
    usages = [usage(job.id, task, "COMPLETED", 3 * (estimated[job.name] or 0)) for job in annotate
              for task in range(int(job.array.split("-")[1]) + 1)]
    decode = next(job for job in record.jobs if job.chunk_of == "decode")
    usages.append(usage(decode.id, 0, "FAILED", 1.0))  # a stage that did not finish teaches nothing
    stages = [cost.as_dict() for cost in group(record, usages, [])]
    by_name = {stage["name"]: stage for stage in stages}
    assert by_name["annotate"]["measured_minutes_per_task"] == pytest.approx(
        3 * by_name["annotate"]["estimated_minutes_per_task"], rel=0.05)
    assert by_name["decode"]["measured_minutes_per_task"] is None
    report = tmp_path / "runs" / record.run_id / "results" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"source": "sacct", "stages": stages}))

    after = plan_json(small, capsys, snowpipe_max_array_size=4)
    for job, earlier in zip(after["jobs"], before["jobs"], strict=True):
        if (job["chunk_of"] or job["name"]) == "annotate":
            assert job["estimate"]["source"].startswith(f"run {record.run_id} (measured x3")
            assert job["estimate"]["minutes_per_task"] == pytest.approx(3 * earlier["estimate"]["minutes_per_task"],
                                                                        rel=0.05, abs=0.02)  # both in 0.01 min
        else:
            assert job["estimate"] == earlier["estimate"]
    assert main(["plan", str(small), "--target-vars", json.dumps({**SCRATCH, "snowpipe_max_array_size": 4})]) == 0
    assert f"annotate: minutes from run {record.run_id}" in capsys.readouterr().out
    other = json.loads(main(["plan", str(small), "--json", "--host", "elsewhere", "--target-vars",
                             json.dumps(SCRATCH)]) == 0 and capsys.readouterr().out)
    assert {job["estimate"]["source"] for job in other["jobs"]} == {"cost model"}
