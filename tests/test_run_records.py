"""Run records (`runs/<run_id>.json`) across versions: a user upgrades snowpipe with runs already submitted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.contract import formats
from pipeline.monitor import runs, tools

# What the submit playbook recorded before records had a version (and before key / known_hosts were kept).
UNVERSIONED = {
    "run_id": "20261101-101010-ab12", "host": "euler", "address": "euler.ethz.ch", "port": 22, "user": "me",
    "remote_dir": "/cluster/scratch/me/snowpipe/runs/20261101-101010-ab12", "commit": "0123456789abcdef",
    "dirty": False, "config_hash": "feedbeef", "config": "/home/me/pipeline-config.yml",
    "submitted": "2026-11-01T10:10:10+00:00",
    "jobs": [{"name": "annotate", "id": "11", "after": [], "array": "0-2", "stages": ["annotate"],
              "script": "/x/jobs/annotate.sbatch", "log": "/x/logs/%x-%A_%a.out"},
             {"name": "train", "id": "12", "after": ["11"], "array": None, "stages": ["train"],
              "script": "/x/jobs/train.sbatch", "log": "/x/logs/%x-%j.out"}],
}


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(runs, "RUNS_DIR", folder)
    monkeypatch.setattr(tools, "RUNS_DIR", folder)
    return folder


def test_a_record_written_before_versions_still_loads_and_lists(runs_dir, capsys):
    (runs_dir / f"{UNVERSIONED['run_id']}.json").write_text(json.dumps(UNVERSIONED))
    record = runs.load_record(None, runs_dir)
    assert record.schema_version == 0 and record.run_id == UNVERSIONED["run_id"]
    assert record.key == "" and record.known_hosts == ""  # ssh's defaults, as before
    assert record.jobs[0].log_of(2) == "/x/logs/annotate-11_2.out" and record.jobs[1].log_of(None) == \
        "/x/logs/train-12.out"
    assert main(["runs"]) == 0
    assert UNVERSIONED["run_id"] in capsys.readouterr().out


def test_remembering_a_state_keeps_what_the_record_held(runs_dir):
    path = runs_dir / f"{UNVERSIONED['run_id']}.json"
    path.write_text(json.dumps({**UNVERSIONED, "note": "the run for chapter 4"}))
    runs.remember_state(runs.load_record(None, runs_dir), "COMPLETED", runs_dir)
    saved = json.loads(path.read_text())
    assert saved["note"] == "the run for chapter 4" and saved["last_state"]["summary"] == "COMPLETED"
    assert saved["jobs"][1]["after"] == ["11"] and saved["submitted"] == UNVERSIONED["submitted"]


def test_a_record_from_a_newer_snowpipe_is_named_not_misread(runs_dir, capsys):
    run_id = "20270101-000000-ffff"
    (runs_dir / f"{run_id}.json").write_text(json.dumps({**UNVERSIONED, "run_id": run_id,
                                                          "schema": formats.RUN_RECORD_SCHEMA + 1}))
    assert main(["status", run_id]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by a newer snowpipe" in err and "update snowpipe" in err


def test_a_damaged_record_is_one_line_and_does_not_hide_the_others(runs_dir, capsys):
    (runs_dir / "broken.json").write_text('{"run_id": "broken", "jobs": [')
    (runs_dir / f"{UNVERSIONED['run_id']}.json").write_text(json.dumps(UNVERSIONED))
    assert main(["runs"]) == 0
    assert UNVERSIONED["run_id"] in capsys.readouterr().out
    assert main(["logs", "broken"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.json: not a run record" in err


def test_the_record_step_refuses_a_submission_that_does_not_match_the_plan_format(tmp_path):
    """The record role pipes {plan, ids, connection}; a plan from elsewhere is named, nothing is written."""
    handed = json.dumps({"plan": {"run_id": "r"}, "ids": {}, "connection": {"host": "c"}})
    done = subprocess.run([sys.executable, "-m", "pipeline.monitor.runs", str(tmp_path)], input=handed,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "does not match the plan format" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


def test_cancel_takes_one_array_task_as_status_names_it(runs_dir, monkeypatch, capsys):
    """`snowpipe status` tells how to cancel an array task that never starts (`snowpipe cancel RUN ID_TASK --yes`):
    that scancels the task alone; a task of no job of the run is refused."""
    from pipeline.monitor import ssh

    (runs_dir / f"{UNVERSIONED['run_id']}.json").write_text(json.dumps(UNVERSIONED))
    asked: list[list[str]] = []

    class Login:
        def __init__(self, record):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, argv, timeout=120.0):
            asked.append(argv)
            return ssh.Result(0, "", "")

    monkeypatch.setattr(ssh, "ClusterConnection", Login)
    assert main(["cancel", UNVERSIONED["run_id"], "11_2", "--yes"]) == 0
    assert asked == [["scancel", "11_2"]] and "cancelled 11_2 of run" in capsys.readouterr().err
    assert main(["cancel", UNVERSIONED["run_id"], "12_0", "--yes"]) == 1  # train is no array
    assert main(["cancel", UNVERSIONED["run_id"], "train", "--yes"]) == 0 and asked[-1] == ["scancel", "12"]
