"""A researcher drags mask.tif into QGIS: it shows the legend's colours and class names, and a full tile pans quickly.

Annotate and infer write their masks window by window through `atomic_raster`; these tests write through it
the same way (no inference needed) and read the published file back as a GIS would.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from pipeline.bands import CLASS_COLOURS, CLASS_NAMES, NODATA
from pipeline.data.grid import Grid
from pipeline.data.mask_style import OVERVIEWS_ABOVE, cog_problems
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.data.writer import atomic_raster

BACKGROUND_VALUE, WATER_VALUE = 0, 3


def grid(size: int) -> Grid:
    x, y = tile_origin("32TNS")
    return Grid(tile_crs("32TNS"), Affine(10, 0, x, 0, -10, y), size, size)


def two_class_mask(size: int) -> np.ndarray:
    """Background and water in a fine random mix (an average of the two would be snow or clouds), a block
    of no data in the corner."""
    mask = np.where(np.random.default_rng(0).random((size, size)) < 0.6, WATER_VALUE, BACKGROUND_VALUE)
    mask = mask.astype(np.uint8)
    mask[: size // 5, : size // 5] = NODATA
    return mask


def write_in_windows(target, data: np.ndarray, profile: dict, step: int = 1000) -> None:
    """As the stages do: one window at a time, windows not aligned with the blocks."""
    with atomic_raster(target, profile) as out:
        for row in range(0, data.shape[-2], step):
            for col in range(0, data.shape[-1], step):
                window = Window(col, row, min(step, data.shape[-1] - col), min(step, data.shape[-2] - row))
                block = data[..., row:row + window.height, col:col + window.width]
                if data.ndim == 2:
                    out.write(block, 1, window=window)
                else:
                    out.write(block, window=window)


def assert_reads_as_classes(ds) -> None:
    colours = ds.colormap(1)
    for value, rgb in enumerate(CLASS_COLOURS):
        assert colours[value] == (*rgb, 255)
    assert colours[NODATA][3] == 0  # no data is transparent
    assert ds.descriptions == ("class",)
    tags = ds.tags()
    assert [tags[f"CLASS_{value}"] for value in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    assert tags[f"CLASS_{NODATA}"] == "no data"
    assert ds.nodata == NODATA


def test_a_full_size_mask_has_the_legend_colours_class_names_and_mode_overviews_as_a_cog(tmp_path):
    size = 2600
    assert size > OVERVIEWS_ABOVE
    mask = two_class_mask(size)
    target = tmp_path / "mask.tif"
    write_in_windows(target, mask, grid(size).geotiff_profile("uint8", NODATA))

    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no draft, no .ovr, no .aux.xml
    with rasterio.open(target) as ds:
        assert (ds.read(1) == mask).all()
        assert_reads_as_classes(ds)
        assert ds.overviews(1) == [2, 4, 8]  # inside the file, down to under one 512 px block
        assert ds.profile["tiled"] and ds.block_shapes == [(512, 512)]
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        for factor in ds.overviews(1):
            overview = ds.read(1, out_shape=(size // factor, size // factor))
            # every overview pixel is a class that was there, never a blend of 0 and 3
            assert set(np.unique(overview)) <= {BACKGROUND_VALUE, WATER_VALUE, NODATA}
            assert (overview[: size // factor // 5 - 1, : size // factor // 5 - 1] == NODATA).all()
        halves = ds.read(1, out_shape=(size // 2, size // 2))
    # and it is the mode: where 3 or 4 of a 2 x 2 block agree, the first overview shows that class
    blocks = mask.reshape(size // 2, 2, size // 2, 2).swapaxes(1, 2).reshape(size // 2, size // 2, 4)
    water = (blocks == WATER_VALUE).sum(axis=2)
    data = (blocks != NODATA).all(axis=2)
    assert (halves[data & (water >= 3)] == WATER_VALUE).all()
    assert (halves[data & (water <= 1)] == BACKGROUND_VALUE).all()
    assert cog_problems(target) == []


def test_a_small_mask_has_the_colours_and_names_but_no_overviews(tmp_path):
    size = 700
    target = tmp_path / "mask.tif"
    write_in_windows(target, two_class_mask(size), grid(size).geotiff_profile("uint8", NODATA), step=300)
    with rasterio.open(target) as ds:
        assert_reads_as_classes(ds)
        assert ds.overviews(1) == []
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    assert cog_problems(target) == []


def test_probabilities_name_their_bands_after_the_classes(tmp_path):
    size = 700
    probabilities = np.random.default_rng(1).integers(0, 256, (len(CLASS_NAMES), size, size), dtype=np.uint8)
    target = tmp_path / "probabilities.tif"
    write_in_windows(target, probabilities, grid(size).geotiff_profile("uint8", None, count=len(CLASS_NAMES)),
                     step=300)
    with rasterio.open(target) as ds:
        assert ds.descriptions == CLASS_NAMES
        assert (ds.read() == probabilities).all()


def test_other_rasters_are_written_as_before(tmp_path):
    """coverage.tif and the quicklooks are not class masks: no colour table, no class names."""
    size = 300
    target = tmp_path / "coverage.tif"
    write_in_windows(target, np.ones((size, size), np.uint8), grid(size).geotiff_profile("uint8", None))
    with rasterio.open(target) as ds:
        assert "CLASS_0" not in ds.tags() and ds.descriptions == (None,)
        with pytest.raises(ValueError):
            ds.colormap(1)


def test_the_cog_check_names_what_a_plain_geotiff_lacks(tmp_path):
    size = OVERVIEWS_ABOVE + 100
    target = tmp_path / "plain.tif"
    with rasterio.open(target, "w", **grid(size).geotiff_profile("uint8", NODATA)) as ds:
        ds.write(np.zeros((size, size), np.uint8), 1)
    problems = cog_problems(target)
    assert any("not COG" in p for p in problems) and any("no overviews" in p for p in problems)
