"""Readers: scenes are found by name, bands land on the right 10 m pixels, DN become reflectance."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.bands import BANDS
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.reader import SceneReader
from pipeline.errors import DataError, SceneError
from tests.builders import TILE, band_shape, write_auxiliary, write_scene

SIZE = 60
FULL = Window(0, 0, SIZE, SIZE)


def read(root, window=FULL, **kwargs):
    scene = discover_scenes(root, TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(root, TILE)) as reader:
        return reader.read_bands(window, **kwargs)


def test_a_pattern_in_20m_and_60m_bands_lands_on_the_right_10m_pixels(tmp_path):
    b05 = np.full(band_shape(SIZE, "B05"), 2000, np.uint16)  # 30 x 30 at 20 m
    b05[4:8, 6:10] = 9000  # 10 m rows 8..15, cols 12..19
    b09 = np.full(band_shape(SIZE, "B09"), 2000, np.uint16)  # 10 x 10 at 60 m
    b09[2:4, 5:7] = 9000  # 10 m rows 12..23, cols 30..41
    write_scene(tmp_path, baseline="0301", dn={"B05": b05, "B09": b09})
    bands, valid = read(tmp_path)
    assert bands.shape == (13, SIZE, SIZE) and valid.all()
    b05_10m, b09_10m = bands[BANDS.index("B05")], bands[BANDS.index("B09")]
    # Pixels whose centres lie inside the block carry its value exactly; far pixels the background.
    assert np.allclose(b05_10m[9:15, 13:19], 0.9) and np.allclose(b05_10m[:7], 0.2)
    assert np.allclose(b05_10m[:, :11], 0.2) and np.allclose(b05_10m[17:], 0.2)
    assert np.allclose(b09_10m[15:21, 33:39], 0.9) and np.allclose(b09_10m[:9], 0.2)
    assert np.allclose(b09_10m[:, :27], 0.2) and np.allclose(b09_10m[27:], 0.2)
    # The block's centre of mass stays where it was (no half-pixel shift).
    rows, cols = np.nonzero(b05_10m > 0.55)
    assert (rows.mean(), cols.mean()) == pytest.approx((11.5, 15.5), abs=0.01)


def test_windows_read_the_same_pixels_as_the_whole_scene(tmp_path):
    rng = np.random.default_rng(1)
    dn = {b: rng.integers(1001, 12000, band_shape(SIZE, b), dtype=np.uint16) for b in BANDS}
    write_scene(tmp_path, dn=dn)
    whole, _ = read(tmp_path)
    part, _ = read(tmp_path, Window(18, 24, 30, 12))
    assert np.array_equal(part, whole[:, 24:36, 18:48])


def test_baseline_offset_is_subtracted_in_floating_point_and_no_data_stays_no_data(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    b02 = np.full((SIZE, SIZE), 3000, np.uint16)
    b02[0, 0], b02[0, 1] = 500, 0  # a dark pixel below the offset, and no data
    write_scene(new, baseline="0400", dn={"B02": b02})
    write_scene(old, date="20210301T102309", baseline="0301", dn={"B02": b02})
    bands_new, valid_new = read(new)
    bands_old, _ = read(old)
    b02_new, b02_old = bands_new[BANDS.index("B02")], bands_old[BANDS.index("B02")]
    assert b02_new[5, 5] == pytest.approx(0.2) and b02_old[5, 5] == pytest.approx(0.3)
    assert b02_new[0, 0] == pytest.approx(-0.05)  # uint16 arithmetic would have wrapped to ~6.45
    assert not valid_new[0, 1] and valid_new[0, 0]
    assert (bands_new[:, 0, 1] == 0).all()


def test_coarser_grid_averages_the_bands(tmp_path):
    write_scene(tmp_path)
    bands, valid = read(tmp_path, Window(0, 0, SIZE // 6, SIZE // 6), factor=6)
    assert bands.shape == (13, 10, 10) and valid.all()
    assert np.allclose(bands, 0.2)


def test_discovery_accepts_every_mission_and_the_hyphenated_auxiliary_folder(tmp_path):
    write_scene(tmp_path, date="20210101T101010", mission="S2A")
    write_scene(tmp_path, date="20220202T101010", mission="S2C")
    write_scene(tmp_path, date="20230303T101010", tile="33TUM")  # another tile: ignored
    (tmp_path / f"{TILE}-auxiliary_data").mkdir()
    (tmp_path / f"{TILE}-auxiliary_data" / f"{TILE}_30m_DEM_AW3D30.tif").write_bytes(b"")
    scenes = discover_scenes(tmp_path, TILE)
    assert [s.date for s in scenes] == ["20210101T101010", "20220202T101010"]
    assert [s.dn_offset for s in scenes] == [1000, 1000]
    assert find_auxiliary(tmp_path, TILE).layers["dem"] is not None


def test_exolabs_files_match_scenes_by_calendar_day(tmp_path):
    exolabs = np.full((SIZE, SIZE), 5, np.uint8)
    write_scene(tmp_path, date="20220301T102309", exolabs=exolabs)
    write_scene(tmp_path, date="20220302T101010")
    by_date = {s.date: s for s in discover_scenes(tmp_path, TILE)}
    assert by_date["20220301T102309"].exolabs.name == "S2_32TNS_2022-03-01_classification.tif"
    assert by_date["20220302T101010"].exolabs is None


def test_dates_that_match_no_scene_are_named(tmp_path):
    write_scene(tmp_path)
    with pytest.raises(DataError, match="20990101T000000.*available: 32TNS_20220301T102309"):
        discover_scenes(tmp_path, TILE, ["20990101T000000"])


def test_an_empty_extracted_data_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "S2A_MSIL1C_20210101T101010_N0301_R022_T32TNS_20210101T150000.zip").write_bytes(b"")
    with pytest.raises(DataError, match=r"no Sentinel-2 L1C scenes of tile 32TNS.*1 product zip\(s\) found"):
        discover_scenes(tmp_path, TILE)


def test_a_missing_band_file_is_named(tmp_path):
    write_scene(tmp_path, skip_bands=("B8A",))
    scene = discover_scenes(tmp_path, TILE)[0]
    with pytest.raises(SceneError, match="scene 32TNS_20220301T102309: band.*B8A missing"):
        SceneReader(scene, TILE)


def test_an_unreadable_jpeg2000_file_is_named(tmp_path):
    safe = write_scene(tmp_path)
    broken = next(safe.rglob("*_B11.jp2"))
    broken.write_bytes(b"not a jpeg 2000 file")
    scene = discover_scenes(tmp_path, TILE)[0]
    with pytest.raises(SceneError, match=r"cannot read .*_B11\.jp2"):
        SceneReader(scene, TILE)


def test_a_band_in_another_crs_than_the_tile_is_refused(tmp_path):
    write_scene(tmp_path, crs=CRS.from_epsg(32633))
    scene = discover_scenes(tmp_path, TILE)[0]
    with pytest.raises(SceneError, match="EPSG:32633.*tile 32TNS is in EPSG:32632"):
        SceneReader(scene, TILE)


def test_auxiliary_layers_are_aligned_to_the_10m_grid(tmp_path):
    glacier = np.zeros((SIZE // 3, SIZE // 3), np.uint8)
    glacier[2, 3] = 1  # one 30 m pixel -> 10 m rows 6..8, cols 9..11
    write_auxiliary(tmp_path, SIZE, glacier=glacier)
    write_scene(tmp_path)
    scene = discover_scenes(tmp_path, TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(tmp_path, TILE)) as reader:
        layer = reader.read_layer("glacier", FULL)
    assert layer.shape == (SIZE, SIZE)
    assert set(zip(*np.nonzero(layer))) == {(r, c) for r in range(6, 9) for c in range(9, 12)}


def test_coverage_without_resampling_matches_the_nearest_footprint_of_every_band(tmp_path):
    b09 = np.full(band_shape(SIZE, "B09"), 3000, np.uint16)
    b09[0:2, 7:] = 0  # 60 m no-data: 10 m rows 0..11, cols 42..59
    b11 = np.full(band_shape(SIZE, "B11"), 3000, np.uint16)
    b11[20:, 0:3] = 0  # 20 m no-data: 10 m rows 40..59, cols 0..5
    b02 = np.full((SIZE, SIZE), 3000, np.uint16)
    b02[30, 30] = 0
    write_scene(tmp_path, dn={"B09": b09, "B11": b11, "B02": b02})
    scene = discover_scenes(tmp_path, TILE)[0]
    expected = np.ones((SIZE, SIZE), bool)
    expected[0:12, 42:] = expected[40:, 0:6] = expected[30, 30] = False
    with SceneReader(scene, TILE) as reader:
        assert np.array_equal(reader.read_valid(FULL), expected)
        window = Window(5, 7, 41, 37)  # offsets that are not multiples of 2 or 6
        assert np.array_equal(reader.read_valid(window), expected[7:44, 5:46])


def test_decoded_tiles_are_kept_between_windows(tmp_path):
    """GDAL's block cache holds decoded JPEG 2000 tiles for the next window that needs them. rasterio's integer
    GDAL_CACHEMAX counts bytes: a setting of 256 (meant as MB) left no cache and every window decoded again."""
    from rasterio.env import get_gdal_config

    write_scene(tmp_path)
    scene = discover_scenes(tmp_path, TILE)[0]
    with SceneReader(scene, TILE):
        assert int(get_gdal_config("GDAL_CACHEMAX")) >= 64 * 2**20
