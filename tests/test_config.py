"""pipeline-config.yml: every mistake is named with its key path, what was expected, and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import PipelineConfig, check_data_folders, load_config
from pipeline.errors import ConfigError
from tests.builders import write_auxiliary, write_scene

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline-config.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("tile_id: 32TNS\ntraining:\n  enable: perhaps\n",
     "training.enable: expected true or false, got 'perhaps'"),
    ("tile_id: 32TNS\nannotation:\n  cloud_detection:\n    treshold: 0.3\n",
     "annotation.cloud_detection.treshold: unknown key; valid keys in annotation.cloud_detection: "
     "threshold, average_over, dilation_size, resolution, window"),
    ("tile_id: 32TNS\nstages: [annotate]\n",
     "stages: unknown key; valid keys in the top level: tiles, dates, paths, download, decode, annotation, "
     "dataset, training, inference, testing"),
    ("tile_id: 32TNS\ndataset:\n  split: random\n", "dataset.split: expected one of 'scene' or 'patch', got 'random'"),
    ("tile_id: 32TNS\ndataset:\n  patch_size: 25.5\n", "dataset.patch_size: expected a whole number, got 25.5"),
    ("tile_id: 32TNS\ndataset:\n  patch_size: 8\n", "dataset.patch_size: expected a number >= 16, got 8"),
    ("tile_id: 32TNS\ndates: ['2021-01-11']\n",
     "dates: expected sensing times like 20210111T102309 (YYYYMMDDTHHMMSS, every tile) or scene ids like "
     "32TNS_20210111T102309 (one tile), got '2021-01-11'"),
    ("tiles: [32TNS, 32TNS]\n", "tiles: lists a tile twice"),
    ("tiles: []\n", "tiles: lists no tile"),
    ("tile_id: 32TNS\ntiles: [32TMS]\n", "give `tiles` (a list) or `tile_id` (one tile), not both"),
    ("tile_id: TNS32\n", "tiles: expected Sentinel-2 tile ids such as 32TNS, got 'TNS32'"),
    ("dates: []\n", "tiles: required key is missing"),
    ("tile_id: 32TNS\npaths: data\n", "paths: expected a mapping of keys, got 'data'"),
    ("tile_id: 32TNS\nannotation:\n  cloud_detection:\n    resolution: 30\n",
     "annotation.cloud_detection.resolution: expected one of 10, 20 or 60, got 30"),
    ("tile_id: 32TNS\ndataset:\n  seed: -5\n", "dataset.seed: expected a number >= 0, got -5"),
    ("tile_id: 32TNS\ntraining:\n  seed: 4294967296\n",
     "training.seed: expected a number < 4294967296, got 4294967296"),
    ("tile_id: 32TNS\ntraining:\n  epochs: 100000\n", "training.epochs: expected a number <= 10000, got 100000"),
    ("tile_id: 32TNS\ndataset:\n  patches_per_scene: 1000000\n",
     "dataset.patches_per_scene: expected a number <= 65536, got 1000000"),
    ("tile_id: 32TNS\ninference:\n  batch_size: 1000\n", "inference.batch_size: expected a number <= 256, got 1000"),
    ("tile_id: 32TNS\ntraining:\n  learning_rate: .inf\n",
     "training.learning_rate: expected a finite number, got inf"),
    ("tile_id: 32TNS\ntraining:\n  gradient_clip: .nan\n", "training.gradient_clip: expected a finite number, got nan"),
    ("tile_id: 32TNS\ndataset:\n  normalisation: {low_percentile: 80, high_percentile: 20}\n",
     "dataset.normalisation: low_percentile (80) must be below high_percentile (20); swap them"),
    ("tile_id: 32TNS\ninference:\n  window: 1024\n  halo: 600\n",
     "inference: halo (600) must be at most half of window (1024)"),
])
def test_each_mistake_is_named_with_its_key_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)


def test_all_problems_are_listed_at_once(tmp_path):
    with pytest.raises(ConfigError, match=r"\(2 problem\(s\)\)") as error:
        load_config(write(tmp_path, "tile_id: 32TNS\ntraining: {enable: 1}\ndataset: {seed: x}\n"))
    assert "training.enable" in str(error.value) and "dataset.seed" in str(error.value)


def test_yaml_syntax_errors_give_the_line(tmp_path):
    with pytest.raises(ConfigError, match="line 2: not valid YAML: mapping values are not allowed here"):
        load_config(write(tmp_path, "tile_id: 32TNS\n  bad_indent: 1\n"))


def test_an_empty_or_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"is empty: it needs at least tiles \(e.g. tiles: \[32TNS\]\)"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="not found: pass its path .* `snowpipe demo-data OUT`"):
        load_config(tmp_path / "nope.yml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = load_config(write(tmp_path, "tile_id: 32TNS\npaths:\n  dataset: ../elsewhere/ds\n"))
    assert config.path("dataset") == (tmp_path.parent / "elsewhere" / "ds").resolve()
    assert config.path("extracted_data") == tmp_path / "extracted_data"
    assert config.resolved()["paths"]["annotated_masks"] == str(tmp_path / "annotated_masks")


def test_missing_data_folders_are_named_with_the_fix(tmp_path):
    config = load_config(write(tmp_path, "tile_id: 32TNS\n"))
    problems = check_data_folders(config, ["annotate", "dataset"])
    assert len(problems) == 1 and "paths.extracted_data: folder" in problems[0]
    assert "snowpipe demo-data OUT" in problems[0]
    problems = check_data_folders(config, ["dataset"])
    assert any("paths.annotated_masks" in p and "annotation.enable: true" in p for p in problems)


def _keys(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        names.add(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= _keys(field.annotation)
    return names


def test_the_root_config_is_valid_and_documents_every_key():
    config = load_config(ROOT / "pipeline-config.yml")
    assert config.tiles == ["32TNS"]
    text = (ROOT / "pipeline-config.yml").read_text()
    missing = sorted(key for key in _keys(PipelineConfig) if f"{key}:" not in text)
    assert not missing, f"keys not documented in pipeline-config.yml: {missing}"


def test_the_cli_exits_2_with_plain_lines_and_no_traceback(tmp_path):
    bad = write(tmp_path, "tile_id: 32TNS\ntraining:\n  enable: perhaps\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "training.enable: expected true or false, got 'perhaps'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_reports_a_missing_data_folder_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(write(tmp_path, "tile_id: 32TNS\n"))],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "paths.extracted_data: folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_frozen_config_is_what_a_batch_job_reads(tmp_path):
    write_scene(tmp_path / "extracted_data")
    write_auxiliary(tmp_path / "extracted_data")
    source = write(tmp_path, "tile_id: 32TNS\npaths:\n  extracted_data: extracted_data\n")
    frozen = tmp_path / "run" / "config.json"
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(source), "--freeze", str(frozen)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(frozen.read_text())
    assert data["paths"]["extracted_data"] == str(tmp_path / "extracted_data") and "base_dir" not in data
    assert data["schema"] == 2  # the frozen format's version; the strict config accepts it, and only it
    assert data["tiles"] == ["32TNS"] and "tile_id" not in data  # `tile_id: X` is read as `tiles: [X]`
    original, reloaded = load_config(source), load_config(frozen)
    assert reloaded.path("dataset") == original.path("dataset")
    # Completion records stay valid whichever of the two a stage was started with.
    assert reloaded.section_hash("annotation", "dataset") == original.section_hash("annotation", "dataset")
    frozen.write_text(json.dumps({**data, "schema": 3}))
    with pytest.raises(ConfigError, match="schema: this frozen config has format version 3, this snowpipe reads up "
                                          "to 2: run the job with the code the run was planned with"):
        load_config(frozen)


NUMBERS = (int, float)


def _unbounded(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Numeric keys without both a lower and an upper bound: a value that passes must work in its stage."""
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _unbounded(field.annotation, f"{path}.")
        elif field.annotation in NUMBERS:
            kinds = {kind for item in field.metadata for kind in ("ge", "gt", "le", "lt") if hasattr(item, kind)}
            if not (kinds & {"ge", "gt"} and kinds & {"le", "lt"}):
                found.append(path)
    return found


def test_every_numeric_key_has_bounds():
    assert _unbounded(PipelineConfig) == []


def test_a_halo_of_half_the_window_is_still_accepted(tmp_path):
    config = load_config(write(tmp_path, "tile_id: 32TNS\ninference:\n  window: 128\n  halo: 64\n"))
    assert (config.inference.window, config.inference.halo) == (128, 64)


def test_a_repeated_key_names_its_path_and_both_lines(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "tile_id: 32TNS\ndataset:\n  seed: 1\n  normalisation:\n    low_percentile: 10\n"
                                    "    low_percentile: 20\n"))
    assert "dataset.normalisation.low_percentile: key given twice, on lines 5 and 6" in str(error.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    config = load_config(write(tmp_path, "tile_id: 32TNS\n"
                                         "inference: {<<: {window: 256, halo: 8}, halo: 16}\n"))
    assert (config.inference.window, config.inference.halo) == (256, 16)
