"""Job specs and the submission plan, without a cluster: what a user writing jobs/*.yml and an inventory meets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import apply_settings
from pipeline.contract import formats
from pipeline.contract.run_record import Connection, record_of_submission
from pipeline.errors import ConfigError
from pipeline.monitor.runs import save_record
from pipeline.submit.jobspec import Resources, load_jobs
from pipeline.submit.plan import REPO_ROOT, Target, make_plan, sbatch_lines, sbatch_quote
from tests.builders import make_config, sid, write_scene

JOBS = REPO_ROOT / "jobs"
DATES = ["20220301T102309", "20220311T102309"]
ALL_STAGES = {"training": {"enable": True}, "inference": {"enable": True}, "testing": {"enable": True}}


def target(**variables) -> Target:
    return Target.from_vars("test-cluster", {"snowpipe_remote_root": "/scratch/me/snowpipe", **variables})


@pytest.fixture
def scenes(tmp_path: Path):
    for date in DATES:
        write_scene(tmp_path, date=date, size=60)
    return make_config(tmp_path, **ALL_STAGES)


def test_the_shipped_pipeline_decodes_on_cpus_first_and_annotates_each_scene_once_it_is_decoded(scenes, tmp_path):
    plan = make_plan(scenes, tmp_path / "pipeline-config.yml", "pipeline", target(), run_id="r1")

    assert [job.name for job in plan.jobs] == ["decode", "annotate", "dataset", "train", "infer", "test"]
    assert [job.after for job in plan.jobs] == [[], ["decode"], ["annotate"], ["dataset"], ["train", "decode"],
                                                ["infer"]]
    assert plan.job("annotate").after_each == ["decode"]   # task i after decode task i (aftercorr)
    assert plan.job("annotate").scene_ids == plan.job("decode").scene_ids == [sid(d) for d in DATES]
    decode = plan.job("decode")
    assert decode.array == "0-1" and "gres" not in decode.sbatch and "gpus" not in decode.sbatch
    assert decode.sbatch["array"] == "0-1%16"
    assert plan.job("annotate").submit_display == (
        "annotate=$(sbatch --parsable --dependency=aftercorr:$decode --kill-on-invalid-dep=yes "
        "/scratch/me/snowpipe/runs/r1/jobs/annotate.sbatch)")
    assert "--dependency=afterok:$train:$decode " in plan.job("infer").submit_display
    assert plan.config["paths"]["decoded"] == "/scratch/me/snowpipe/data/decoded"  # type: ignore[index]
    # the space the decoded rasters need, announced by `snowpipe plan` and the dry run: 13 bands of 60 px scenes
    per_scene = 2 * (4 * 60**2 + 6 * 30**2 + 3 * 10**2)
    assert plan.decoded_dir == "/scratch/me/snowpipe/data/decoded" and plan.decoded_bytes == 2 * per_scene
    plan.jobs.pop(0)
    assert plan.jobs[0].array == "0-1" and plan.jobs[3].array == "0-1"
    assert plan.jobs[0].sbatch["array"] == "0-1%8"
    assert plan.run_dir == "/scratch/me/snowpipe/runs/r1"
    paths = plan.config["paths"]
    assert isinstance(paths, dict)
    assert paths["extracted_data"] == "/scratch/me/snowpipe/data/extracted_data"
    assert paths["results"] == "/scratch/me/snowpipe/runs/r1/results"
    # "every scene" is pinned to the scenes sent: the cluster's shared data may hold other runs' scenes
    assert plan.config["dates"] == [sid(d) for d in DATES]  # as scene ids: one tile's time is not another's
    train = plan.job("train")
    assert train.sbatch["gres"] == "gpu:1" and train.sbatch["signal"] == "B:USR1@300"
    assert train.log == "/scratch/me/snowpipe/runs/r1/logs/%x-%j.out"
    assert plan.jobs[0].log == "/scratch/me/snowpipe/runs/r1/logs/%x-%A_%a.out"
    assert train.submit_display == ("train=$(sbatch --parsable --dependency=afterok:$dataset "
                                       "--kill-on-invalid-dep=yes /scratch/me/snowpipe/runs/r1/jobs/train.sbatch)")


def test_every_shipped_job_spec_loads():
    for path in sorted(JOBS.glob("*.yml")):
        assert load_jobs(JOBS, path.stem), path


def test_resources_layer_inventory_defaults_then_spec_then_overrides():
    defaults = Resources(account="es_group", time="10:00:00", modules=["cuda/11.8.0"])
    overrides = {"*": Resources(memory="1G"), "train": Resources(gpus=2)}
    jobs = {job.name: job for job in load_jobs(JOBS, "pipeline", defaults, overrides)}

    assert jobs["train"].resources.account == "es_group"       # inventory default
    assert jobs["train"].resources.time == "24:00:00"          # the job spec wins over the default
    assert jobs["train"].resources.memory == "1G"              # "*" override wins over the spec
    assert jobs["train"].resources.gpus == 2                   # per-job override
    assert jobs["annotate"].resources.modules == ["cuda/11.8.0"]


def test_two_gpus_launch_one_training_process_per_gpu(scenes, tmp_path):
    plan = make_plan(scenes, tmp_path / "c.yml", "train-multi-gpu", target(snowpipe_gpu_request="gpus",
                     snowpipe_job_defaults={"gpu_type": "a100"}), run_id="r1")
    train = plan.jobs[0]
    assert train.sbatch["gpus"] == "a100:2" and train.sbatch["ntasks-per-node"] == 2
    assert train.commands[0].processes == 2


def test_a_disabled_stage_drops_its_job_and_rewires_the_chain(tmp_path):
    for date in DATES:
        write_scene(tmp_path, date=date, size=60)
    (tmp_path / "masks").mkdir()
    config = make_config(tmp_path, annotation={"enable": False}, **ALL_STAGES)
    plan = make_plan(config, tmp_path / "c.yml", "pipeline", target(), run_id="r1")
    assert [job.name for job in plan.jobs] == ["decode", "dataset", "train", "infer", "test"]
    # annotate's task-by-task wait on decode becomes the dataset's wait for the whole decode array
    assert plan.job("dataset").after == ["decode"] and plan.job("dataset").after_each == []


def test_mistakes_in_a_job_spec_name_the_key_and_the_fix(tmp_path):
    (tmp_path / "bad.yml").write_text("jobs:\n  - name: x\n    stages: [train]\n    gpu: 1\n")
    with pytest.raises(ConfigError, match=r"jobs.0.gpu: unknown key; valid keys: .*gpus"):
        load_jobs(tmp_path, "bad")
    (tmp_path / "order.yml").write_text("jobs:\n  - name: a\n    stages: [train]\n    after: [b]\n")
    with pytest.raises(ConfigError, match="runs after 'b', which is not a job listed before it"):
        load_jobs(tmp_path, "order")
    (tmp_path / "array.yml").write_text("jobs:\n  - name: a\n    stages: [train]\n    array: true\n")
    with pytest.raises(ConfigError, match="must be per-scene stages"):
        load_jobs(tmp_path, "array")
    (tmp_path / "time.yml").write_text("jobs:\n  - name: a\n    stages: [train]\n    time: 2 hours\n")
    with pytest.raises(ConfigError, match="expected a SLURM time"):
        load_jobs(tmp_path, "time")
    with pytest.raises(ConfigError, match="job spec .*missing.yml not found; job specs in .*: array, bad"):
        load_jobs(tmp_path, "missing")


def test_inventory_mistakes_are_named():
    with pytest.raises(ConfigError, match="snowpipe_remote_root must be an absolute path"):
        Target.from_vars("c", {"snowpipe_remote_root": "scratch"})
    with pytest.raises(ConfigError, match="snowpipe_gpu_request must be 'gres'"):
        target(snowpipe_gpu_request="cards")
    with pytest.raises(ConfigError, match="snowpipe_job_defaults is invalid"):
        target(snowpipe_job_defaults={"cpu": 4})


def test_sbatch_values_are_quoted_as_sbatch_reads_them():
    assert sbatch_quote("04:00:00") == "04:00:00"
    assert sbatch_quote("snowpipe run 1") == '"snowpipe run 1"'
    assert sbatch_quote('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ConfigError, match="line break"):
        sbatch_quote("a\n#SBATCH --uid=0")
    assert sbatch_lines({"time": "1:00", "requeue": None, "comment": "a b"}) == [
        '--comment="a b"', "--requeue", "--time=1:00"]


def test_set_overrides_are_validated_like_the_file(scenes):
    changed = apply_settings(scenes, ["paths.results=/scratch/r", "training.epochs=3"])
    assert changed.path("results") == Path("/scratch/r") and changed.training.epochs == 3
    with pytest.raises(ConfigError, match="epochs"):
        apply_settings(scenes, ["training.epochs=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_settings(scenes, ["training.epochs"])


def test_snowpipe_plan_prints_the_jobs_and_their_json(scenes, tmp_path, capsys):
    config = tmp_path / "pipeline-config.yml"
    config.write_text(f"tile_id: 32TNS\npaths:\n  extracted_data: {tmp_path}\n"
                      "training: {enable: true}\ninference: {enable: true}\ntesting: {enable: true}\n")
    variables = json.dumps({"snowpipe_remote_root": "/scratch/x"})
    assert main(["plan", str(config), "--target-vars", variables, "--run-id", "r9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["run_id"] == "r9" and len(plan["jobs"]) == 6
    # the versions a reader checks: the plan's own, and the frozen config's (config.json)
    assert plan["schema"] == formats.PLAN_SCHEMA == 2 and plan["config"]["schema"] == formats.CONFIG_SCHEMA
    assert plan["formats"]["requeue_exit_code"] == 75
    assert plan["formats"]["dependency_all"] == "afterok:" and plan["formats"]["dependency_each"] == "aftercorr:"
    assert main(["plan", str(config), "--target-vars", variables, "--job", "nope"]) == 2
    assert "job spec" in capsys.readouterr().err


def test_the_run_record_lists_jobs_with_ids_and_dependencies(scenes, tmp_path):
    plan = make_plan(scenes, tmp_path / "c.yml", "pipeline", target(), run_id="r1")
    ids = {"decode": "10", "annotate": "11", "dataset": "14", "train": "15", "infer": "16", "test": "19"}
    record = record_of_submission(plan, ids, Connection(host="local", address="127.0.0.1", port=2222, user="me"))
    path = save_record(tmp_path / "runs", record)
    saved = json.loads(path.read_text())
    assert {"schema", "run_id", "host", "remote_dir", "commit", "config_hash", "jobs"} <= saved.keys()
    assert saved["schema"] == 1 and saved["port"] == 2222
    # it names the cluster, the user and the key's path: readable by its owner only
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert saved["jobs"][2] == {**saved["jobs"][2], "name": "dataset", "id": "14", "after": ["11"], "array": None}
    assert saved["jobs"][1] == {**saved["jobs"][1], "name": "annotate", "after": ["10"], "array": "0-1"}


def test_snowpipe_plan_reads_the_inventory_as_ansible_templates_it(scenes, tmp_path, capsys):
    config = tmp_path / "pipeline-config.yml"
    config.write_text(f"tile_id: 32TNS\npaths:\n  extracted_data: {tmp_path}\n"
                      "training: {enable: true}\ninference: {enable: true}\ntesting: {enable: true}\n")
    assert main(["plan", str(config), "-i", str(REPO_ROOT / "inventory" / "euler.yml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["host"] == "euler" and plan["remote_root"] == "/cluster/scratch/your_eth_username/snowpipe"
    assert plan["jobs"][3]["sbatch"]["account"] == "es_your_group" and plan["jobs"][3]["sbatch"]["gpus"] == "1"
    assert main(["plan", str(config), "--json"]) == 0  # the default: the local cluster's inventory
    assert json.loads(capsys.readouterr().out)["remote_root"] == str(REPO_ROOT / ".cluster" / "remote")


def test_the_submission_key_names_the_same_work_on_the_same_cluster(scenes, tmp_path):
    """What the preflight role compares to refuse a duplicate: equal for the same submission, and not when the
    data, the config or the cluster differ."""
    def key(config=scenes, cluster=None) -> str:
        return make_plan(config, tmp_path / "c.yml", "pipeline", cluster or target(), run_id="r1").submission_key

    same = key()
    assert key() == same
    assert key(cluster=Target.from_vars("other", {"snowpipe_remote_root": "/scratch/me/snowpipe"})) != same
    assert key(config=apply_settings(scenes, ["training.epochs=3"])) != same
    band = next(tmp_path.glob("*.SAFE/GRANULE/*/IMG_DATA/*_B03.jp2"))
    band.write_bytes(band.read_bytes() + b"\0")  # re-extracted data
    assert key() != same


def test_scenes_per_task_gives_each_array_task_several_scenes_and_their_files(tmp_path):
    dates = [*DATES, "20220321T102309"]
    for date in dates:
        write_scene(tmp_path, date=date, size=60)
    config = make_config(tmp_path, decode={"enable": False}, **ALL_STAGES)
    plan = make_plan(config, tmp_path / "c.yml", "pipeline", target(snowpipe_job_overrides={
        "infer": {"scenes_per_task": 2}}), run_id="r1")
    assert plan.job("infer").array == "0-1"
    assert plan.job("infer").scene_ids == [f"{sid(dates[0])},{sid(dates[1])}", sid(dates[2])]
    assert plan.job("annotate").scene_ids == [sid(d) for d in dates]  # one scene per task where not asked
    staged = plan.job("infer").commands[0].staged[0]
    assert len(staged.task_filters) == 2
    first = staged.task_filters[0].split()
    assert sum(rule.startswith("--include=/S2") for rule in first) == 2 and first[-1] == "--exclude=*"
    assert first.count("--exclude=*") == 1


def test_an_array_task_runs_every_scene_of_its_comma_separated_list(tmp_path):
    for date in DATES:
        write_scene(tmp_path, date=date, size=60)
    config = tmp_path / "pipeline-config.yml"
    config.write_text(f"tile_id: 32TNS\npaths:\n  extracted_data: {tmp_path}\n  decoded: {tmp_path / 'dec'}\n"
                      "annotation: {enable: false}\n")
    assert main(["stage", "decode", str(config), "--scene", ",".join(DATES)]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == sorted(
        p.name for p in tmp_path.glob("S2*.SAFE"))
    assert main(["stage", "decode", str(config), "--scene", f"{DATES[0]},nope"]) == 2


def test_an_array_job_of_two_stages_runs_both_on_the_same_scenes_or_is_refused_by_name(tmp_path):
    """annotate covers `dates`, infer `inference.dates`: with the same count but other scenes, task i would run
    infer on annotate's scene. Same scenes: one list for both; other scenes: the job is named and refused."""
    for date in [*DATES, "20220321T102309"]:
        write_scene(tmp_path, date=date, size=60)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "both.yml").write_text("jobs:\n  - name: both\n    stages: [annotate, infer]\n    array: true\n")
    config = make_config(tmp_path, dates=DATES[:2], inference={"enable": True, "dates": DATES[:2]})
    plan = make_plan(config, tmp_path / "c.yml", "both", target(), run_id="r1", jobs_dir=jobs)
    assert plan.job("both").scene_ids == [sid(d) for d in DATES[:2]]

    other = make_config(tmp_path, dates=DATES[:2], inference={"enable": True,
                                                              "dates": [DATES[0], "20220321T102309"]})
    with pytest.raises(ConfigError, match=r"job both: its stages annotate and infer cover different scenes "
                                          r"\(2 and 2; differing: 32TNS_20220311T102309, 32TNS_20220321T102309\)"):
        make_plan(other, tmp_path / "c.yml", "both", target(), run_id="r1", jobs_dir=jobs)
