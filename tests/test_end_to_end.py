"""A researcher's first session: demo data, `snowpipe run`, masks that agree with the truth, a dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.metrics import class_scores, confusion_matrix

pytestmark = pytest.mark.slow


def snowpipe(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = snowpipe("demo-data", str(out), "--scenes", "3", "--size", "240", "--seed", "0")
    assert result.returncode == 0, result.stderr
    result = snowpipe("run", str(out / "pipeline-config.yml"), "--stages", "annotate,dataset")
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # preview.png is a picture
def test_masks_lie_on_the_scene_grid_and_agree_with_the_truth(demo):
    out, _ = demo
    matrix = np.zeros((4, 4), np.int64)
    for truth_path in sorted((out / "truth").glob("*.tif")):
        date = truth_path.stem  # truth/{scene id}.tif: the scene's folders have its name
        b02 = next((out / "extracted_data").glob(f"*_{date.rpartition('_')[2]}_*.SAFE/GRANULE/*/IMG_DATA/*_B02.jp2"))
        with rasterio.open(out / "annotated_masks" / date / "mask.tif") as mask, rasterio.open(b02) as band, \
                rasterio.open(truth_path) as truth:
            assert (mask.crs, mask.transform, mask.shape) == (band.crs, band.transform, band.shape)
            assert mask.dtypes[0] == "uint8" and mask.nodata == 255 and mask.profile["tiled"]
            predicted, reference = mask.read(1), truth.read(1)
        assert ((predicted == 255) >= (reference == 255)).all()  # outside the swath is never labelled
        with rasterio.open(out / "annotated_masks" / date / "preview.png") as preview:
            assert preview.driver == "PNG" and (preview.width, preview.height) == (2 * 240 + 8, 240)
        matrix += confusion_matrix(predicted, reference)
    scores = class_scores(matrix)
    assert scores["snow"]["iou"] >= 0.75
    assert scores["water"]["iou"] >= 0.75
    assert scores["clouds"]["iou"] >= 0.55  # the real s2cloudless model finds the synthetic clouds


def test_the_dataset_manifest_describes_a_scene_split(demo):
    out, result = demo
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert manifest["split"] == "scene" and train["patches"] > 0 and val["patches"] > 0
    assert not set(train["dates"]) & set(val["dates"])
    assert len(manifest["normalisation"]["low"]) == 13 and manifest["channels"][-1] == "DEM"
    images = np.load(out / "dataset" / "train_images.npy", mmap_mode="r")
    assert images.shape[0] == train["patches"] and np.isfinite(images).all()
    assert "dataset: 3 done" in result.stderr and "annotate: 3 done" in result.stderr


def test_a_second_run_skips_complete_outputs_and_force_redoes_them(demo):
    out, _ = demo
    config = str(out / "pipeline-config.yml")
    again = snowpipe("run", config, "--stages", "annotate,dataset")
    assert again.returncode == 0
    assert "annotate: 0 done, 3 already complete" in again.stderr
    assert "dataset: 0 done, 3 already complete" in again.stderr
    date = sorted(p.stem for p in (out / "truth").glob("*.tif"))[1]
    one = snowpipe("stage", "annotate", config, "--scene", date, "--force")
    assert one.returncode == 0 and "annotate: 1 done" in one.stderr


def test_a_slurm_array_task_annotates_the_scene_at_its_index(demo):
    out, _ = demo
    dates = sorted(p.stem for p in (out / "truth").glob("*.tif"))
    env_run = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate",
                              str(out / "pipeline-config.yml"), "--force"],
                             capture_output=True, text=True, env={**os.environ,
                                                                  "SLURM_ARRAY_TASK_ID": "2"})
    assert env_run.returncode == 0, env_run.stderr
    assert dates[2] in env_run.stderr and dates[0] not in env_run.stderr


def test_unknown_stages_and_dates_are_plain_errors(demo):
    out, _ = demo
    config = str(out / "pipeline-config.yml")
    result = snowpipe("run", config, "--stages", "annotate,upload")
    assert result.returncode == 2 and "unknown stage 'upload'; stages: download, decode, annotate" in result.stderr
    result = snowpipe("stage", "annotate", config, "--scene", "20990101T000000")
    assert result.returncode == 2 and "--scene 20990101T000000: no such scene of tile" in result.stderr  # usage


def test_a_cancelled_job_leaves_no_file_that_looks_complete(demo):
    out, _ = demo
    config = yaml.safe_load((out / "pipeline-config.yml").read_text())
    config["annotation"]["cloud_detection"]["window"] = 16  # many small windows: slow enough to interrupt
    slow = out / "slow.yml"
    slow.write_text(yaml.safe_dump(config))
    date = sorted(p.stem for p in (out / "truth").glob("*.tif"))[0]
    folder = out / "annotated_masks" / date
    shutil.rmtree(folder)
    job = subprocess.Popen([sys.executable, "-m", "pipeline", "stage", "annotate", str(slow), "--scene", date,
                            "--force"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(folder.parent.glob(f".{date}.partial-*/.mask.tif.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what SLURM sends on scancel or at the time limit
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not folder.exists() and not list(folder.parent.glob(f".{date}*"))  # no partial folder, no lock
    rerun = snowpipe("stage", "annotate", str(out / "pipeline-config.yml"), "--scene", date)
    assert rerun.returncode == 0 and "annotate: 1 done" in rerun.stderr


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_train_infer_and_test_follow_on_the_demo(demo):
    out, _ = demo
    config = yaml.safe_load((out / "pipeline-config.yml").read_text())
    config["training"].update(epochs=2, model={"base_channels": 4, "depth": 2})  # a smoke run, not a good model
    quick = out / "quick.yml"
    quick.write_text(yaml.safe_dump(config))
    result = snowpipe("run", str(quick), "--stages", "train,infer,test")
    assert result.returncode == 0, result.stderr
    assert "train: 1 done" in result.stderr and "infer: 3 done" in result.stderr
    for truth_path in sorted((out / "truth").glob("*.tif")):
        folder = out / "results" / "predictions" / truth_path.stem
        with rasterio.open(folder / "mask.tif") as mask, rasterio.open(truth_path) as truth:
            assert (mask.crs, mask.transform, mask.shape) == (truth.crs, truth.transform, truth.shape)
            assert set(np.unique(mask.read(1))) <= {0, 1, 2, 3, 255}
        assert (folder / "overlay.png").is_file()
    metrics = json.loads((out / "results" / "testing" / "metrics.json").read_text())
    assert metrics["reference"] == "exolabs" and len(metrics["scenes"]) == 3
    assert set(metrics["overall"]["classes"]) == {"background", "snow", "clouds", "water"}
    assert (out / "results" / "training" / "loss.png").is_file()
