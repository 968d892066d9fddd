"""Annotate: the overlay order, coverage, seamless windows, skipping finished scenes, bad scenes."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from pipeline.bands import BANDS, CLOUDS, NODATA, SNOW, WATER
from pipeline.stages import annotate
from pipeline.stages.base import StageFailed
from tests.builders import band_shape, make_config, sid, write_auxiliary, write_scene

SIZE = 60
DATE = "20220301T102309"
CLOUD = dict(zip(BANDS, [.55, .52, .5, .5, .52, .55, .56, .55, .56, .3, .03, .4, .3]))
VEGETATION = dict(zip(BANDS, [.12, .09, .08, .06, .1, .2, .25, .28, .3, .08, .003, .17, .09]))


def cloudy_bands(cloud_rows: slice, cloud_cols: slice, offset: int = 1000) -> dict[str, np.ndarray]:
    """Vegetation with one rectangular thick cloud, given on the 10 m grid (multiples of 6)."""
    dn = {}
    for band in BANDS:
        factor = SIZE // band_shape(SIZE, band)[0]
        array = np.full(band_shape(SIZE, band), round(VEGETATION[band] * 1e4) + offset, np.uint16)
        rows = slice(cloud_rows.start // factor, cloud_rows.stop // factor)
        cols = slice(cloud_cols.start // factor, cloud_cols.stop // factor)
        array[rows, cols] = round(CLOUD[band] * 1e4) + offset
        dn[band] = array
    return dn


@pytest.fixture()
def overlay_scene(tmp_path):
    """Lakes, JRC water, a glacier, ExoLabs snow and a cloud that overlap, plus two no-data corners."""
    lakes = np.zeros((SIZE, SIZE), np.uint8)
    lakes[0:30, 0:30] = 1
    surface_water = np.zeros((SIZE // 3, SIZE // 3), np.uint8)
    surface_water[10:12, 0:2] = 1  # 10 m rows 30..35, cols 0..5
    glacier = np.zeros((SIZE // 3, SIZE // 3), np.uint8)
    glacier[0:5, 5:15] = 1  # 10 m rows 0..14, cols 15..44
    exolabs = np.full((SIZE, SIZE), 5, np.uint8)
    exolabs[:, 24:36] = 4
    exolabs[54:, 54:] = 0  # not observed
    dn = cloudy_bands(slice(36, 60), slice(30, 60))
    dn["B02"][0:6, 54:60] = 0  # outside the swath
    write_auxiliary(tmp_path, SIZE, lakes=lakes, surface_water=surface_water, glacier=glacier)
    write_scene(tmp_path, DATE, SIZE, dn=dn, exolabs=exolabs)
    return tmp_path


def read_outputs(config):
    folder = config.path("annotated_masks") / sid(DATE)
    with rasterio.open(folder / "mask.tif") as m, rasterio.open(folder / "coverage.tif") as c:
        assert m.nodata == NODATA and m.crs.to_epsg() == 32632 and (m.width, m.height) == (SIZE, SIZE)
        return m.read(1), c.read(1)


@pytest.mark.parametrize(("resolution", "average_over", "dilation_size"), [(10, 4, 2), (60, 6, 0)])
def test_later_layers_win_water_glacier_exolabs_snow_clouds(overlay_scene, resolution, average_over,
                                                             dilation_size):
    config = make_config(overlay_scene, annotation={"cloud_detection": {
        "resolution": resolution, "average_over": average_over, "dilation_size": dilation_size}})
    report = annotate.run(config)
    assert report.count("done") == 1
    mask, coverage = read_outputs(config)
    assert (mask[0:14, 0:14] == WATER).all()  # lakes only
    assert (mask[0:14, 16:23] == SNOW).all()  # glacier over lake
    assert (mask[16:30, 25:29] == SNOW).all()  # ExoLabs snow over lake
    assert (mask[31:35, 0:5] == WATER).all()  # JRC surface water
    assert (mask[16:30, 0:20] == WATER).all()
    assert (mask[44:52, 31:35] == CLOUDS).all()  # cloud over ExoLabs snow
    assert (mask[44:54, 40:52] == CLOUDS).all()
    assert (mask[40:60, 0:20] == 0).all()  # plain vegetation
    assert (mask[0:6, 54:60] == NODATA).all() and (coverage[0:6, 54:60] == 0).all()  # no Sentinel-2 data
    assert (mask[54:, 54:] == NODATA).all() and (coverage[54:, 54:] == 0).all()  # ExoLabs not observed
    assert coverage.sum() == SIZE * SIZE - 2 * 36
    assert set(np.unique(mask)) == {0, SNOW, CLOUDS, WATER, NODATA}


def test_clouds_computed_in_small_windows_match_the_whole_scene(tmp_path):
    rng = np.random.default_rng(3)
    dn = cloudy_bands(slice(12, 48), slice(6, 30))
    for band in BANDS:  # texture, so that windows see different probabilities
        dn[band] = (dn[band] * rng.uniform(0.7, 1.3, dn[band].shape)).astype(np.uint16)
    write_auxiliary(tmp_path, SIZE)
    write_scene(tmp_path, DATE, SIZE, dn=dn, exolabs=np.full((SIZE, SIZE), 5, np.uint8))
    masks = {}
    for resolution in (10, 20):
        for window in (16, 1024):
            config = make_config(tmp_path, annotation={
                "cloud_detection": {"resolution": resolution, "window": window}})
            annotate.run(config, force=True)
            masks[resolution, window] = read_outputs(config)[0]
        assert np.array_equal(masks[resolution, 16], masks[resolution, 1024])
        assert (masks[resolution, 16] == CLOUDS).any()


def test_a_finished_scene_is_skipped_until_forced_or_changed(overlay_scene):
    config = make_config(overlay_scene)
    assert annotate.run(config).count("done") == 1
    assert annotate.run(config).count("skipped") == 1
    assert annotate.run(config, force=True).count("done") == 1
    changed = make_config(overlay_scene, annotation={"cloud_detection": {"threshold": 0.5}})
    assert annotate.run(changed).count("done") == 1


def test_a_broken_scene_fails_alone_and_leaves_nothing_that_looks_complete(overlay_scene):
    write_scene(overlay_scene, "20220401T102309", SIZE, exolabs=np.full((SIZE, SIZE), 5, np.uint8),
                skip_bands=("B12",))
    config = make_config(overlay_scene)
    with pytest.raises(StageFailed, match=r"20220401T102309: band\(s\) B12 missing"):
        annotate.run(config)
    masks = config.path("annotated_masks")
    assert (masks / sid(DATE) / "mask.tif").is_file()
    assert not (masks / sid("20220401T102309")).exists() or not any((masks / sid("20220401T102309")).iterdir())
    skipping = make_config(overlay_scene, annotation={"on_scene_error": "skip"})
    report = annotate.run(skipping)
    assert [o.status for o in report.outcomes] == ["skipped", "failed"]


def test_a_scene_without_exolabs_file_is_named(tmp_path):
    write_auxiliary(tmp_path, SIZE)
    write_scene(tmp_path, DATE, SIZE)
    with pytest.raises(StageFailed, match="no ExoLabs file S2_32TNS_2022-03-01\\*.tif"):
        annotate.run(make_config(tmp_path))
    report = annotate.run(make_config(tmp_path, annotation={"exolabs_snow": False}))
    assert report.count("done") == 1


def test_scenes_run_in_parallel_workers(overlay_scene):
    write_scene(overlay_scene, "20220401T102309", SIZE, exolabs=np.full((SIZE, SIZE), 5, np.uint8))
    config = make_config(overlay_scene, annotation={"workers": 2})
    report = annotate.run(config)
    assert [o.status for o in report.outcomes] == ["done", "done"]
