"""Inputs on the wrong grid: a band, auxiliary layer or ExoLabs raster in the tile's CRS but with another extent,
shape or resolution used to be warped onto the scene and read as no data (0-39 % coverage, exit 0, "complete").
Now the scene fails when the file is opened, naming the file, what it covers, what the scene needs and the fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.bands import AUX_FILES, BANDS
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.reader import SceneReader
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.demo import generate_demo
from pipeline.errors import SceneError
from tests.builders import TILE, band_shape, sid, write_auxiliary, write_scene

SIZE = 60
DATE = "20220301T102309"
LAYERS = ("lakes", "surface_water", "glacier", "dem")


def write_off_grid(path: Path, shape: tuple[int, int], resolution: float, dx: float = 0.0, dy: float = 0.0,
                   crs: CRS | None = None, driver: str = "GTiff", value: int = 4) -> Path:
    """A real raster in the tile's CRS whose upper-left corner is moved by (dx, dy) metres from the tile's."""
    x, y = tile_origin(TILE)
    options = {"QUALITY": "100", "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    with rasterio.open(path, "w", driver=driver, width=shape[1], height=shape[0], count=1, dtype="uint16",
                       crs=crs or tile_crs(TILE), transform=Affine(resolution, 0, x + dx, 0, -resolution, y + dy),
                       **options) as dst:
        dst.write(np.full(shape, value, np.uint16), 1)
    return path


def open_scene(root: Path, *layers: str) -> None:
    scene = discover_scenes(root, TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(root, TILE)) as reader:
        reader.check_layers(*layers)
        for layer in layers:
            assert reader.read_layer(layer, Window(0, 0, SIZE, SIZE)).shape == (SIZE, SIZE)


def band_file(root: Path, band: str) -> Path:
    return next(root.rglob(f"*_{band}.jp2"))


def test_a_band_cropped_to_part_of_the_tile_is_refused_naming_the_file_and_the_fix(tmp_path):
    write_scene(tmp_path)
    cropped = write_off_grid(band_file(tmp_path, "B11"), (30, 20), 20, driver="JP2OpenJPEG")  # 20 of 30 columns
    with pytest.raises(SceneError) as error:
        open_scene(tmp_path)
    message = str(error.value)
    assert message.startswith(f"scene {TILE}_{DATE}: {cropped} covers x 499980..500380")
    assert "(20 x 30 px of 20 m)" in message and "(60 x 60 px of 10 m)" in message
    assert "B11 needs 30 x 30 px of 20 m there" in message and message.endswith("re-extract the product zip")
    assert "\n" not in message


def test_a_band_of_another_tile_in_the_same_zone_is_refused(tmp_path):
    """Same CRS, same shape, 10 km further east: the old reader warped it and found no data anywhere."""
    write_scene(tmp_path)
    shifted = write_off_grid(band_file(tmp_path, "B03"), (SIZE, SIZE), 10, dx=10_000, driver="JP2OpenJPEG")
    with pytest.raises(SceneError, match=rf"{shifted.name} covers x 509980\.\.510580.*re-extract"):
        open_scene(tmp_path)


def test_a_band_resampled_to_another_resolution_is_refused(tmp_path):
    """B05 (a 20 m band) delivered at 10 m over the same extent."""
    write_scene(tmp_path)
    resampled = write_off_grid(band_file(tmp_path, "B05"), (SIZE, SIZE), 10, driver="JP2OpenJPEG")
    with pytest.raises(SceneError, match=rf"{resampled.name} has 60 x 60 px of 10 m, but B05 is a 20 m band"):
        open_scene(tmp_path)


def test_a_scene_whose_b02_is_not_10m_names_b02(tmp_path):
    """B02 defines the scene's grid: a wrong B02 is named itself, not every band that disagrees with it."""
    write_scene(tmp_path)
    write_off_grid(band_file(tmp_path, "B02"), (30, 30), 20, driver="JP2OpenJPEG")
    with pytest.raises(SceneError, match=r"_B02\.jp2 has 30 x 30 px of 20 m, but B02 is a 10 m band"):
        open_scene(tmp_path)


@pytest.mark.parametrize("layer", LAYERS)
def test_an_auxiliary_layer_that_does_not_cover_the_scene_is_named(tmp_path, layer):
    write_scene(tmp_path)
    folder = write_auxiliary(tmp_path, SIZE)
    path = write_off_grid(folder / f"{TILE}_{AUX_FILES[layer]}", (10, 20), 30, dy=-300)  # the southern half
    with pytest.raises(SceneError) as error:
        open_scene(tmp_path, layer)
    message = str(error.value)
    assert f"{path} covers x 499980..500580, y 5199420..5199720 (20 x 10 px of 30 m), only 50% of" in message
    assert message.endswith("re-download the auxiliary data of tile 32TNS")


def test_an_exolabs_raster_on_another_extent_fails_the_scene_in_the_cli_naming_it(tmp_path):
    """The issue's case: the right CRS, another extent; annotate used to finish "complete" with 39 % coverage."""
    write_auxiliary(tmp_path, SIZE)
    write_scene(tmp_path, DATE, SIZE)
    exolabs = tmp_path / "ExoLabs_classification_S2" / "S2_32TNS_2022-03-01_classification.tif"
    exolabs.parent.mkdir()
    write_off_grid(exolabs, (30, 30), 20, dx=360)  # shifted 36 px east: covers 40 % of the scene
    config = tmp_path / "pipeline-config.yml"
    config.write_text(yaml.safe_dump({
        "tile_id": TILE,
        "paths": {"extracted_data": ".", "annotated_masks": "masks", "dataset": "dataset", "results": "results",
                  "work": "work"},
        "annotation": {"enable": True, "clouds": False, "exolabs_snow": True}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config)],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert line == "error: annotate failed for 1 scene(s):"
    detail = result.stderr.splitlines()[result.stderr.splitlines().index(line) + 1]
    assert f"{DATE}: {exolabs} covers x 500340..500940" in detail and "only 40% of the scene's" in detail
    assert detail.endswith("re-download the ExoLabs classification of 2022-03-01 for tile 32TNS")
    assert not (tmp_path / "masks" / sid(DATE) / "mask.tif").exists()


def test_rasters_in_another_crs_are_checked_in_the_scene_crs(tmp_path):
    """A DEM in WGS 84 that covers the scene is read (reprojected); one that covers part of it is named."""
    write_scene(tmp_path)
    folder = write_auxiliary(tmp_path, SIZE)
    dem = folder / f"{TILE}_{AUX_FILES['dem']}"
    x, y = tile_origin(TILE)
    west, south, east, north = transform_bounds(tile_crs(TILE), "EPSG:4326", x, y - 600, x + 600, y)
    for share, expected in ((1.0, None), (0.5, "only 4[5-9]%|only 5[0-5]%")):
        east_edge = west + (east - west) * share + 0.0005 * (share == 1.0)
        with rasterio.open(dem, "w", driver="GTiff", width=40, height=40, count=1, dtype="int16", crs="EPSG:4326",
                           transform=Affine((east_edge - west + 0.0005) / 40, 0, west - 0.0005, 0,
                                            -(north - south + 0.001) / 40, north + 0.0005)) as dst:
            dst.write(np.full((40, 40), 1500, np.int16), 1)
        if expected is None:
            open_scene(tmp_path, "dem")
        else:
            with pytest.raises(SceneError, match=rf"{dem.name} covers .*\(from EPSG:4326\).*({expected})"):
                open_scene(tmp_path, "dem")


def test_rasters_larger_than_the_scene_or_overhanging_by_less_than_a_pixel_are_read(tmp_path):
    """Sentinel-2 grids share the tile's corner; a scene whose size is not a multiple of 6 has 20 m and 60 m
    bands that overhang its far edges by part of a pixel, and an ExoLabs file may cover more than the scene."""
    size = 61  # 60 m bands: 11 px = 660 m for a 610 m scene
    write_scene(tmp_path, size=size)
    write_auxiliary(tmp_path, size)
    exolabs = tmp_path / "ExoLabs_classification_S2" / "S2_32TNS_2022-03-01_classification.tif"
    exolabs.parent.mkdir()
    write_off_grid(exolabs, (50, 50), 20, dx=-200, dy=200)  # 1 km square around the scene
    scene = discover_scenes(tmp_path, TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(tmp_path, TILE)) as reader:
        assert band_shape(size, "B09") == (11, 11)
        reader.check_layers(*LAYERS, "exolabs")
        assert (reader.read_layer("exolabs", Window(0, 0, size, size)) == 4).all()


def test_demo_data_of_any_size_lies_on_the_scene_grid(tmp_path):
    """`snowpipe demo-data` writes conforming rasters (sizes that are and are not multiples of 6)."""
    for size in (97, 120):
        root = tmp_path / str(size)
        generate_demo(root, scenes=1, size=size, seed=1)
        extracted = root / "extracted_data"
        scene = discover_scenes(extracted, TILE)[0]
        with SceneReader(scene, TILE, find_auxiliary(extracted, TILE)) as reader:
            assert (reader.grid.width, reader.grid.height) == (size, size)
            reader.check_layers(*LAYERS, "exolabs")
            assert reader.read_dn(Window(0, 0, size, size)).shape == (len(BANDS), size, size)
