"""Each stage is declared once (pipeline/registry.py); the runner, job specs, planner, config checks and
the README read that declaration, and planning a submission or validating a config never loads torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import check_data_folders
from pipeline.errors import ConfigError
from pipeline.registry import PER_SCENE, STAGES, stage_dates
from pipeline.runner import select_stages
from pipeline.submit.jobspec import load_jobs
from tests.builders import make_config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_validating_and_planning_import_no_torch():
    """`snowpipe validate`, `plan` and `status` run on a laptop in a second; torch takes several. Every command
    builds the whole parser first (pipeline.verify's checkpoint check imported torch there: 1.4 s each)."""
    code = ("import sys, pipeline.cli, pipeline.runner, pipeline.submit.plan, pipeline.submit.plan_command; "
            "pipeline.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 's2cloudless', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_stage_table_is_the_registry():
    rows = re.findall(r"^\| (\d\w?) \| (\w+) \| .* \| (yes|no) \| (yes|no) \|$", README.read_text(), re.MULTILINE)
    assert [(name, per_scene == "yes", gpu == "yes") for _, name, per_scene, gpu in rows] == \
        [(stage.name, stage.per_scene, stage.needs_gpu) for stage in STAGES.values()]


def test_each_stage_covers_the_scenes_of_its_own_dates_rule(tmp_path):
    config = make_config(tmp_path).model_copy(update={"dates": ["20220101T000000", "20220201T000000"]})
    infer_only = config.model_copy(update={"inference": config.inference.model_copy(
        update={"dates": ["20220201T000000"]})})
    assert stage_dates(config, "annotate") == stage_dates(config, "test") == config.dates
    assert stage_dates(infer_only, "infer") == stage_dates(infer_only, "test") == ["20220201T000000"]
    assert stage_dates(infer_only, "annotate", ["20220101T000000"]) == ["20220101T000000"]  # --scene wins


def test_the_test_stage_needs_extracted_data_like_every_stage_that_reads_it(tmp_path):
    """It discovers its scenes and reads ExoLabs there (the old check forgot it)."""
    config = make_config(tmp_path / "nowhere")
    problems = check_data_folders(config, ["test"])
    assert len(problems) == 1 and problems[0].startswith("paths.extracted_data")


def test_a_job_spec_runs_only_registered_stages_and_arrays_only_per_scene_ones(tmp_path):
    (tmp_path / "bad.yml").write_text("jobs:\n  - name: x\n    stages: [annotate, upload]\n")
    with pytest.raises(ConfigError, match="'upload'; stages a job can run: decode, annotate, dataset, train, infer"):
        load_jobs(tmp_path, "bad")
    (tmp_path / "array.yml").write_text("jobs:\n  - name: x\n    stages: [annotate, dataset]\n    array: true\n")
    with pytest.raises(ConfigError, match=f"per-scene stages \\({', '.join(PER_SCENE)}\\)"):
        load_jobs(tmp_path, "array")


def test_run_order_is_the_registry_order(tmp_path):
    assert select_stages(make_config(tmp_path), ["test", "annotate", "infer"]) == ["annotate", "infer", "test"]
