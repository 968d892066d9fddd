"""Dataset: patches lie inside coverage, the split is by scene, rare water is sampled, runs repeat exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.bands import BANDS, NODATA, WATER
from pipeline.data.normalise import Normaliser
from pipeline.errors import DataError
from pipeline.stages import dataset
from pipeline.stages.base import StageFailed
from tests import builders
from tests.builders import band_shape, write_auxiliary, write_raster, write_scene

SIZE = 120
DATES = ["20220101T101010", "20220201T101010", "20220301T101010", "20220401T101010"]


def write_mask(root, date, mask, coverage):
    write_raster(root / "masks" / date / "mask.tif", mask.astype(np.uint8), 10, nodata=NODATA)
    write_raster(root / "masks" / date / "coverage.tif", coverage.astype(np.uint8), 10)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four scenes; each has a no-data band on the right and a small lake (rare water)."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    write_auxiliary(root, SIZE, dem=rng.integers(500, 3000, (SIZE // 3, SIZE // 3)).astype(np.int16))
    for k, date in enumerate(DATES):
        dn = {b: rng.integers(1200, 9000, band_shape(SIZE, b), dtype=np.uint16) for b in BANDS}
        write_scene(root, date, SIZE, dn=dn)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[:, 40:] = 1  # snow
        mask[60:, :30] = 2  # clouds
        mask[10 + k:16 + k, 10:16] = WATER
        coverage = np.ones((SIZE, SIZE), np.uint8)
        coverage[:, 96:] = 0
        mask[coverage == 0] = NODATA
        write_mask(root, date, mask, coverage)
    return root


def make_config(root, **sections):
    """The masks here are written by hand, the user's own: annotation is disabled, as it must be for them."""
    return builders.make_config(root, annotation={"enable": False}, **sections)


def settings(**extra):
    return {"patch_size": 32, "patches_per_scene": 12, "include_dem": True, **extra}


def load(config, split):
    folder = config.path("dataset")
    manifest = json.loads((folder / "manifest.json").read_text())
    images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
    masks = np.load(folder / f"{split}_masks.npy", mmap_mode="r")
    return manifest, images, masks


def test_patches_lie_inside_coverage_and_validation_scenes_are_not_trained_on(scenes):
    config = make_config(scenes, dataset=settings())
    report = dataset.run(config)
    assert report.count("done") == 4
    manifest, images, masks = load(config, "train")
    _, val_images, val_masks = load(config, "validation")
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert manifest["split"] == "scene" and len(val["dates"]) == 1
    assert not set(train["dates"]) & set(val["dates"])
    assert images.shape == (36, 14, 32, 32) and images.dtype == np.float16
    assert val_images.shape == (12, 14, 32, 32) and masks.shape == (36, 32, 32)
    assert not (masks == NODATA).any() and not (val_masks == NODATA).any()
    for _date, row, col in train["positions"] + val["positions"]:
        assert 0 <= row <= SIZE - 32 and 0 <= col <= 96 - 32  # inside coverage (columns < 96)
    assert manifest["channels"] == [*BANDS, "DEM"]
    assert np.isfinite(images).all() and np.abs(images[:, :13]).max() < 1.0
    assert sum(train["class_pixels"]) == 36 * 32 * 32


def test_normalisation_comes_from_the_training_scenes(scenes):
    config = make_config(scenes, dataset=settings())
    dataset.run(config)
    manifest, images, _ = load(config, "train")
    normaliser = Normaliser.from_dict(manifest["normalisation"])
    assert normaliser.low_percentile == 2 and normaliser.high_percentile == 98
    # Uniform DN 1200..9000 minus the 1000 offset: reflectance 0.02..0.8, percentiles 2/98 at 0.036, 0.784
    assert normaliser.low[1] == pytest.approx(0.036, abs=0.01)
    assert normaliser.high[1] == pytest.approx(0.784, abs=0.01)
    dem = images[:, 13].astype(np.float32)
    assert abs(dem.mean()) < 0.2 and 0.7 < dem.std() < 1.3


def test_balanced_sampling_draws_rare_water_more_often(scenes):
    fractions = {}
    for mode in ("uniform", "balanced"):
        config = make_config(scenes, dataset=settings(sampling=mode, patches_per_scene=40))
        dataset.run(config, force=True)
        manifest, _, _ = load(config, "train")
        fractions[mode] = manifest["class_distribution"]["train"][WATER]
    assert fractions["balanced"] > 1.5 * fractions["uniform"]


def test_the_same_seed_gives_the_same_dataset_and_another_seed_does_not(scenes, tmp_path):
    first = make_config(scenes, dataset=settings(seed=7), paths={"dataset": str(tmp_path / "a")})
    second = make_config(scenes, dataset=settings(seed=7), paths={"dataset": str(tmp_path / "b")})
    other = make_config(scenes, dataset=settings(seed=8), paths={"dataset": str(tmp_path / "c")})
    for config in (first, second, other):
        dataset.run(config)
    a, b, c = (load(config, "train") for config in (first, second, other))
    assert np.array_equal(a[1], b[1]) and a[0]["splits"] == b[0]["splits"]
    assert a[0]["splits"]["train"]["positions"] != c[0]["splits"]["train"]["positions"]


def test_the_patch_split_mixes_scenes_as_the_thesis_did(scenes):
    config = make_config(scenes, dataset=settings(split="patch"))
    dataset.run(config)
    manifest, _, _ = load(config, "validation")
    assert manifest["split"] == "patch"
    assert set(manifest["splits"]["validation"]["dates"]) & set(manifest["splits"]["train"]["dates"])


def test_a_complete_dataset_is_skipped_and_a_scene_without_mask_is_named(scenes, tmp_path):
    config = make_config(scenes, dataset=settings(), paths={"dataset": str(tmp_path / "d")})
    dataset.run(config)
    assert dataset.run(config).count("skipped") == 4
    write_scene(scenes, "20220501T101010", SIZE)
    try:
        with pytest.raises(StageFailed, match="32TNS_20220501T101010: no annotated mask in .*/32TNS_20220501T101010"):
            dataset.run(config)
        # Still the old, complete dataset: nothing half-written replaced it.
        assert (tmp_path / "d" / "manifest.json").is_file()
        skipping = make_config(scenes, dataset=settings(on_scene_error="skip"),
                               paths={"dataset": str(tmp_path / "d")})
        report = dataset.run(skipping)  # the complete dataset of the four usable scenes is kept
        assert report.count("skipped") == 4 and report.count("failed") == 1
    finally:
        for path in scenes.glob("*20220501T101010*"):
            shutil.rmtree(path)


def test_validation_dates_must_be_scenes_with_masks(scenes):
    config = make_config(scenes, dataset=settings(validation_dates=["20230101T000000"]))
    with pytest.raises(DataError, match="dataset.validation_dates: 20230101T000000 not among the scenes"):
        dataset.run(config)
