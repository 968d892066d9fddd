"""Finished work is never thrown away, and nothing half-done passes for complete.

A researcher's project meets ordinary events: it is moved, copied, reached through a symlink, run twice at
once, killed between two writes, interrupted by scancel. Each story below runs the real `snowpipe` on demo
scenes and checks what is left on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import records
from pipeline.records import annotation
from tests.builders import sid

pytestmark = pytest.mark.slow

SCENES = 2
SIZE = 128


def snowpipe(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def quick_config(folder: Path) -> Path:
    """The demo config with a smoke-test training, so every stage runs in seconds."""
    path = folder / "pipeline-config.yml"
    config = yaml.safe_load(path.read_text())
    config["training"].update(epochs=2, workers=0, device="cpu", model={"base_channels": 4, "depth": 2})
    config["inference"].update(device="cpu", quicklooks=False)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A demo project after one complete `snowpipe run` of every stage."""
    out = tmp_path_factory.mktemp("finished") / "project"
    made = snowpipe("demo-data", str(out), "--scenes", str(SCENES), "--size", str(SIZE), "--seed", "3")
    assert made.returncode == 0, made.stderr
    result = snowpipe("run", str(quick_config(out)))
    assert result.returncode == 0, result.stderr
    assert f"infer: {SCENES} done" in result.stderr and "train: 1 done" in result.stderr
    return out


@pytest.fixture()
def project(finished, tmp_path) -> Path:
    """A private copy of the finished project (times and all), so each story may change it."""
    copy = tmp_path / "project"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def assert_nothing_redone(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    text = result.stderr
    assert f"annotate: 0 done, {SCENES} already complete" in text
    assert f"dataset: 0 done, {SCENES} already complete" in text
    assert "train: 0 done, 1 already complete" in text and "starting a new training" not in text
    assert f"infer: 0 done, {SCENES} already complete" in text
    assert "test: 0 done" in text


def test_moving_the_project_redoes_nothing_and_keeps_the_model(project, tmp_path):
    best = (project / "results" / "training" / "best.pt").read_bytes()
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    project.rename(moved)
    assert_nothing_redone(snowpipe("run", str(moved / "pipeline-config.yml")))
    assert (moved / "results" / "training" / "best.pt").read_bytes() == best


def test_copying_the_project_without_its_file_times_redoes_nothing(project, tmp_path):
    copy = tmp_path / "copied"
    subprocess.run(["cp", "-r", str(project), str(copy)], check=True)  # new modification times
    assert_nothing_redone(snowpipe("run", str(copy / "pipeline-config.yml")))


def test_a_project_reached_through_a_symlink_redoes_nothing(project, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(project)
    assert_nothing_redone(snowpipe("run", "pipeline-config.yml", cwd=link))
    assert_nothing_redone(snowpipe("run", str(link / "pipeline-config.yml")))


def test_a_stage_run_from_node_local_scratch_trusts_the_copied_records(project, tmp_path):
    """What a batch job with stage_inputs does: rsync the folders to $TMPDIR, point the stage there."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("extracted_data", "annotated_masks"):
        subprocess.run(["rsync", "-a", f"{project / name}/", f"{scratch / name}/"], check=True)
    result = snowpipe("stage", "annotate", str(project / "pipeline-config.yml"),
                      "--set", f"paths.extracted_data={scratch / 'extracted_data'}",
                      "--set", f"paths.annotated_masks={scratch / 'annotated_masks'}")
    assert result.returncode == 0 and f"annotate: 0 done, {SCENES} already complete" in result.stderr


def test_a_changed_input_is_redone_and_the_old_model_is_kept_aside(project):
    band = next((project / "extracted_data").glob("*.SAFE/GRANULE/*/IMG_DATA/*_B03.jp2"))
    data = bytearray(band.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle of the code stream: another picture
    band.write_bytes(bytes(data))
    result = snowpipe("run", str(project / "pipeline-config.yml"), "--stages", "annotate,dataset,train")
    assert result.returncode == 0, result.stderr
    assert f"annotate: 1 done, {SCENES - 1} already complete" in result.stderr
    assert "dataset: " in result.stderr and f"dataset: 0 done, {SCENES} already complete" not in result.stderr
    aside = list((project / "results" / "training").glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "best.pt").is_file()


def scene_dates(project: Path) -> list[str]:
    """The sensing times of the demo's scenes (truth/{scene id}.tif): `--scene` takes them too."""
    return sorted(p.stem.rpartition("_")[2] for p in (project / "truth").glob("*.tif"))


def test_old_records_that_still_match_are_upgraded_in_place(project):
    """Records of snowpipe before schema 2 named absolute paths and times: kept when they still match."""
    config = str(project / "pipeline-config.yml")
    date = scene_dates(project)[0]
    folder = project / "annotated_masks" / sid(date)
    record = json.loads((folder / records.RECORD_NAME).read_text())
    from pipeline.config import load_config
    from pipeline.data.layout import discover_scenes, find_auxiliary

    loaded = load_config(config)
    scene = discover_scenes(loaded.path("extracted_data"), loaded.tiles, [date])[0]
    key = annotation.record_key(scene, loaded, find_auxiliary(loaded.path("extracted_data"), scene.tile))
    old = {k: v for k, v in record.items() if k not in ("schema", "outputs")} | {"inputs": key.legacy_inputs}
    (folder / records.RECORD_NAME).write_text(json.dumps(old))
    result = snowpipe("stage", "annotate", config, "--scene", date)
    assert result.returncode == 0 and "annotate: 0 done, 1 already complete" in result.stderr
    upgraded = json.loads((folder / records.RECORD_NAME).read_text())
    assert upgraded["schema"] == records.SCHEMA and upgraded["inputs"] == key.inputs

    old["inputs"] = "0123456789abcdef"  # an old record of other files
    (folder / records.RECORD_NAME).write_text(json.dumps(old))
    result = snowpipe("stage", "annotate", config, "--scene", date)
    assert result.returncode == 0 and "annotate: 1 done" in result.stderr
    assert "completion record of an older snowpipe" in result.stderr


def test_a_kill_between_two_writes_of_annotate_leaves_the_old_masks_or_none(project):
    """kill -9 after mask.tif is written, before coverage.tif and the record: nothing is published."""
    config = str(project / "pipeline-config.yml")
    date = scene_dates(project)[0]
    folder = project / "annotated_masks" / sid(date)
    before = (folder / "mask.tif").read_bytes()
    killed = snowpipe("stage", "annotate", config, "--scene", date, "--force",
                      env={"SNOWPIPE_KILL_AT": "published mask.tif"})
    assert killed.returncode == -signal.SIGKILL
    assert (folder / "mask.tif").read_bytes() == before and records.vouches(folder)
    assert list(folder.parent.glob(f".{sid(date)}.partial-*"))  # what the killed run left, hidden
    result = snowpipe("stage", "annotate", config, "--scene", date, "--force")
    assert result.returncode == 0 and "reclaimed" in result.stderr
    assert not list(folder.parent.glob(f".{sid(date)}.partial-*"))


def test_a_kill_between_the_two_renames_of_a_swap_restores_the_old_masks(project):
    config = str(project / "pipeline-config.yml")
    date = scene_dates(project)[0]
    folder = project / "annotated_masks" / sid(date)
    before = (folder / "mask.tif").read_bytes()
    killed = snowpipe("stage", "annotate", config, "--scene", date, "--force",
                      env={"SNOWPIPE_KILL_AT": f"moved aside {sid(date)}"})
    assert killed.returncode == -signal.SIGKILL and not folder.exists()
    result = snowpipe("stage", "annotate", config, "--scene", date)
    assert result.returncode == 0 and "restored" in result.stderr
    assert "annotate: 0 done, 1 already complete" in result.stderr and (folder / "mask.tif").read_bytes() == before


def test_a_kill_during_the_first_annotate_leaves_nothing_the_dataset_would_take(project):
    config = str(project / "pipeline-config.yml")
    date = scene_dates(project)[0]
    shutil.rmtree(project / "annotated_masks" / sid(date))
    killed = snowpipe("stage", "annotate", config, "--scene", date, env={"SNOWPIPE_KILL_AT": "published coverage.tif"})
    assert killed.returncode == -signal.SIGKILL
    assert not (project / "annotated_masks" / sid(date)).exists()
    result = snowpipe("stage", "dataset", config)
    assert result.returncode == 1 and f"no annotated mask in {project / 'annotated_masks' / sid(date)}" in result.stderr


def test_masks_without_a_record_are_the_users_only_when_annotation_is_off(project):
    config_path = project / "pipeline-config.yml"
    date = scene_dates(project)[0]
    (project / "annotated_masks" / sid(date) / records.RECORD_NAME).unlink()  # like masks made by hand
    result = snowpipe("stage", "dataset", str(config_path), "--force")
    assert result.returncode == 1 and "not a complete annotate output" in result.stderr
    assert "annotation.enable: false" in result.stderr
    config = yaml.safe_load(config_path.read_text())
    config["annotation"]["enable"] = False
    config_path.write_text(yaml.safe_dump(config))
    result = snowpipe("stage", "dataset", str(config_path), "--force")
    assert result.returncode == 0 and f"dataset: {SCENES} done" in result.stderr


def test_two_runs_of_one_config_at_once_share_the_work(project):
    """Today's users start `snowpipe run` twice by mistake: both finish, each output is written once."""
    config = str(project / "pipeline-config.yml")
    shutil.rmtree(project / "annotated_masks")
    shutil.rmtree(project / "dataset")
    command = [sys.executable, "-m", "pipeline", "run", config, "--stages", "annotate,dataset"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    done = sum(int(re.search(r"^annotate: (\d+) done", text, re.MULTILINE)[1]) for text in outputs)
    assert done == SCENES  # every scene annotated once, by one of the two
    manifest = json.loads((project / "dataset" / "manifest.json").read_text())
    assert all((project / "dataset" / name).is_file() for name in manifest["outputs"])
    assert not list(project.glob(".dataset.partial*")) and not list((project / "annotated_masks").glob(".*"))


def test_scancel_during_the_dataset_leaves_no_partial_folder(project):
    config = str(project / "pipeline-config.yml")
    result = snowpipe("stage", "dataset", config, "--force",
                      env={"SNOWPIPE_KILL_AT": "published manifest.json", "SNOWPIPE_KILL_SIGNAL": "TERM"})
    assert result.returncode == 130 and "interrupted" in result.stderr
    assert not list(project.glob(".dataset.partial*"))
    manifest = json.loads((project / "dataset" / "manifest.json").read_text())
    assert all((project / "dataset" / name).is_file() for name in manifest["outputs"])  # the old one stays


def test_a_killed_dataset_build_is_reclaimed_by_the_next_run(project):
    config = str(project / "pipeline-config.yml")
    killed = snowpipe("stage", "dataset", config, "--force", env={"SNOWPIPE_KILL_AT": "published manifest.json"})
    assert killed.returncode == -signal.SIGKILL and list(project.glob(".dataset.partial*"))
    result = snowpipe("stage", "dataset", config, "--force")
    assert result.returncode == 0 and "reclaimed" in result.stderr and not list(project.glob(".dataset.partial*"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_annotate_workers_die_with_a_killed_run(project):
    config_path = project / "pipeline-config.yml"
    config = yaml.safe_load(config_path.read_text())
    config["annotation"]["workers"] = 2
    config["annotation"]["cloud_detection"]["window"] = 16  # slow enough to be caught at work
    config_path.write_text(yaml.safe_dump(config))
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config_path), "--stages", "annotate",
                            "--force"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((project / "annotated_masks").glob(".*.partial-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [pid for pid in _children(run.pid) if "pipeline" in Path(f"/proc/{pid}/cmdline").read_text()
               or "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers
    run.kill()
    run.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive


def test_a_scene_without_any_valid_pixel_is_an_error_not_a_success(project):
    """An ExoLabs raster that observed nothing (all 0) masks every pixel: no silent empty mask."""
    import numpy as np
    import rasterio

    date = scene_dates(project)[0]
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    exolabs = next((project / "extracted_data" / "ExoLabs_classification_S2").glob(f"S2_*_{day}*"))
    with rasterio.open(exolabs, "r+") as raster:
        raster.write(np.zeros((raster.height, raster.width), raster.dtypes[0]), 1)
    result = snowpipe("stage", "annotate", str(project / "pipeline-config.yml"), "--scene", date)
    assert result.returncode == 1 and date in result.stderr and "of the scene has data" in result.stderr
    assert exolabs.name in result.stderr
