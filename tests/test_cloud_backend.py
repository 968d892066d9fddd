"""The cloud detector's backends: the compiled model equals LightGBM's, the cache, the fallback, no-data pixels.

CI never compiles s2cloudless's own model (minutes): a small LightGBM model trained here stands in for it, and
the real model's equality is measured by bench/annotate_speed.py (docs/benchmarks.md, "Annotate").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.bands import BANDS, CLOUDS, NODATA
from pipeline.data.layout import discover_scenes
from pipeline.data.reader import SceneReader
from pipeline.stages import annotate, cloud_backend, clouds
from tests.builders import make_config, sid, write_auxiliary, write_scene
from tests.test_annotate import DATE, SIZE, cloudy_bands


def _train(path):
    """30 trees of up to 31 leaves on 10 features, 'cloudy' where B02 and B04 are bright: like the real one,
    a binary model with a sigmoid, read through the same code."""
    import lightgbm

    rng = np.random.default_rng(0)
    features = rng.uniform(0.0, 0.8, (6000, 10)).astype(np.float32)
    label = ((features[:, 1] + features[:, 2] > 0.7) ^ (rng.random(6000) < 0.05)).astype(int)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.2, "verbose": -1,
              "num_threads": 1, "deterministic": True, "min_data_in_leaf": 5}
    lightgbm.train(params, lightgbm.Dataset(features, label), num_boost_round=30).save_model(str(path))
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The small model and a cache holding its compiled library (built once for the module)."""
    root = tmp_path_factory.mktemp("cloud-backend")
    model = _train(root / "small_lightgbm.txt")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SNOWPIPE_CACHE", str(cache))
        folder = cloud_backend.build(model, threads=2, say=lambda line: None)
    return model, cache, folder


@pytest.fixture()
def stand_in(small_model, monkeypatch):
    """The small model in place of s2cloudless's, its cache in use, no model loaded yet in this process."""
    model, cache, _ = small_model
    monkeypatch.setenv("SNOWPIPE_CACHE", str(cache))
    monkeypatch.setattr(cloud_backend, "default_model_file", lambda: model)
    monkeypatch.setattr(clouds, "_MODELS", {})
    return model


@pytest.fixture()
def cloudy_scene(tmp_path):
    """A textured cloud over vegetation, a corner without data in any band, a strip without data in B03 only."""
    rng = np.random.default_rng(3)
    dn = cloudy_bands(slice(12, 48), slice(6, 30))
    for band in BANDS:
        dn[band] = (dn[band] * rng.uniform(0.7, 1.3, dn[band].shape)).astype(np.uint16)
    for band in BANDS:
        factor = SIZE // dn[band].shape[0]
        dn[band][:24 // factor, 42 // factor:] = 0  # outside the swath: rows 0-23, columns 42-59
    dn["B03"][50:52, :] = 0  # one band's edge
    write_auxiliary(tmp_path, SIZE)
    write_scene(tmp_path, DATE, SIZE, dn=dn, exolabs=np.full((SIZE, SIZE), 5, np.uint8))
    return tmp_path


def _mask(config):
    folder = config.path("annotated_masks") / sid(DATE)
    record = json.loads((folder / ".snowpipe-complete.json").read_text())
    with rasterio.open(folder / "mask.tif") as src:
        return src.read(1), record


def test_the_compiled_model_gives_lightgbms_probabilities(small_model):
    model, _, folder = small_model
    compiled = cloud_backend.load_compiled(folder, threads=2)
    reference = cloud_backend.LightGBMModel(model, threads=1)
    features = np.random.default_rng(7).uniform(0.0, 1.0, (50_000, 10)).astype(np.float32)
    features[:100] = 0.0
    got, expected = compiled.predict(features), reference.predict(features)
    assert got.dtype == np.float32 and got.shape == (50_000,)
    assert np.max(np.abs(got - expected)) <= 1e-6
    assert 0.05 < np.mean(expected > 0.4) < 0.95  # a model that says both
    assert compiled.predict(features[:0]).shape == (0,)


@pytest.mark.parametrize("resolution", [10, 20])
def test_compiled_and_lightgbm_write_the_same_masks(cloudy_scene, stand_in, resolution):
    masks = {}
    for backend in ("lightgbm", "compiled"):
        config = make_config(cloudy_scene, annotation={"cloud_detection": {
            "resolution": resolution, "window": 16, "backend": backend}})
        assert annotate.run(config, force=True).count("done") == 1
        masks[backend], record = _mask(config)
        assert record["cloud_detector"] == backend
    assert np.array_equal(masks["lightgbm"], masks["compiled"])
    assert (masks["compiled"] == CLOUDS).any() and (masks["compiled"] == 0).any()


def test_auto_uses_the_built_library_and_never_builds_in_the_tests(cloudy_scene, stand_in, tmp_path, monkeypatch):
    model, note = cloud_backend.load("auto")
    assert model.name == "compiled" and "model.so" in note
    monkeypatch.setenv("SNOWPIPE_CACHE", str(tmp_path / "empty-cache"))
    model, note = cloud_backend.load("auto")  # SNOWPIPE_DETECTOR_BUILD=never (tests/conftest.py)
    assert model.name == "lightgbm" and "SNOWPIPE_DETECTOR_BUILD=never" in note
    assert not (tmp_path / "empty-cache").exists()


def test_without_a_compiler_the_stage_runs_on_lightgbm_and_says_so(cloudy_scene, stand_in, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("SNOWPIPE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("SNOWPIPE_DETECTOR_BUILD")
    monkeypatch.setattr(cloud_backend, "compiler", lambda: None)
    config = make_config(cloudy_scene)
    assert annotate.run(config).count("done") == 1
    assert _mask(config)[1]["cloud_detector"] == "lightgbm"
    said = " ".join(capsys.readouterr().err.split())
    assert "cloud detector: LightGBM: the compiled detector is not available" in said
    assert "no C compiler (gcc)" in said and "snowpipe build-detector" in said
    with pytest.raises(cloud_backend.DetectorBackendError, match="no C compiler"):
        cloud_backend.load("compiled")


def test_a_library_that_does_not_reproduce_its_probe_is_never_used(small_model, tmp_path, monkeypatch):
    model, _, folder = small_model
    copy = tmp_path / folder.name
    copy.mkdir()
    (copy / "model.so").write_bytes((folder / "model.so").read_bytes())
    with np.load(folder / "probe.npz") as probe:
        np.savez(copy / "probe.npz", features=probe["features"], expected=probe["expected"] + 1e-3)
    with pytest.raises(cloud_backend.DetectorBackendError, match="differs from LightGBM"):
        cloud_backend.load_compiled(copy)


def test_the_detector_sees_only_valid_pixels_and_fills_the_rest(cloudy_scene, stand_in):
    config = make_config(cloudy_scene, annotation={"cloud_detection": {"resolution": 20, "backend": "compiled"}})
    scene = discover_scenes(config.path("extracted_data"), config.tiles)[0]
    detector = clouds.CloudDetector(config.annotation.cloud_detection, 10.0, say=lambda line: None)
    assert detector.fill == detector.model.predict(np.zeros((1, 10), np.float32))[0]
    with SceneReader(scene, scene.tile) as reader:
        bands, valid, all_bands = detector.read(reader, Window(0, 0, SIZE // 2, SIZE // 2))
    assert bands.shape == (10, SIZE // 2, SIZE // 2) and not all_bands
    assert not valid[:12, 21:].any() and valid[24:26].all()  # B03's gap is not the detector's
    seen = []
    detector.model = type("Spy", (), {"name": "spy", "predict": lambda self, rows: seen.append(len(rows))
                                      or np.full(len(rows), 0.5, np.float32)})()
    prob = detector.probability(bands, valid)
    assert seen == [valid.sum()] and (prob[valid] == 0.5).all() and (prob[~valid] == detector.fill).all()


def _read_13_bands(self, reader, window):
    """What the detector read before: all 13 bands on its grid, and their validity."""
    reflectance, valid = reader.read_bands(window, factor=self.factor)
    return reflectance[clouds.DETECTOR_INDEX], valid, self.factor == 1


@pytest.mark.parametrize("resolution", [10, 20])
def test_masks_are_as_before_away_from_no_data_in_one_of_the_other_bands(cloudy_scene, stand_in, monkeypatch,
                                                                         resolution):
    """Before: 13 bands read, every pixel predicted. No data in all bands: the fill value is what the model gave
    those pixels before, so nothing changes. No data in B03 alone (not a detector band) changes the 20 m
    grid's masks only within the averaging and dilation radius of those rows."""
    masks = {}
    for before in (True, False):
        with monkeypatch.context() as patch:
            if before:
                patch.setattr(clouds.CloudDetector, "every_pixel", True)
                patch.setattr(clouds.CloudDetector, "read", _read_13_bands)
            config = make_config(cloudy_scene, annotation={"cloud_detection": {
                "resolution": resolution, "window": 16, "backend": "compiled"}})
            annotate.run(config, force=True)
            masks[before] = _mask(config)[0]
    assert (masks[False][:24, 42:] == NODATA).all() and (masks[False][50:52] == NODATA).all()
    differ = np.argwhere(masks[True] != masks[False])
    if resolution == 10:
        assert len(differ) == 0
    else:  # radius 4 (10 m px, average_over) + 2 (dilation) + 2 (one 20 m pixel, bilinear) of rows 50-51
        assert all(50 - 8 <= row <= 51 + 8 for row, _ in differ)


def test_the_detector_bands_are_the_models_and_backend_is_not_in_the_record_key(tmp_path):
    from s2cloudless.utils import MODEL_BANDS

    assert list(clouds.DETECTOR_BANDS) == list(MODEL_BANDS)
    keys = {make_config(tmp_path, annotation={"cloud_detection": {"backend": b}}).section_hash("annotation")
            for b in cloud_backend.BACKENDS}
    assert len(keys) == 1
