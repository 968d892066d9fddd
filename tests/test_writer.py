"""Atomic outputs: a crash leaves nothing that looks complete; a finished file appears whole."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from pipeline.data.grid import Grid
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.data.writer import atomic_path, atomic_raster


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.tif"
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_raster_keeps_the_previous_complete_file(tmp_path):
    from affine import Affine

    x, y = tile_origin("32TNS")
    grid = Grid(tile_crs("32TNS"), Affine(10, 0, x, 0, -10, y), 300, 300)
    target = tmp_path / "mask.tif"
    with atomic_raster(target, grid.geotiff_profile("uint8", 255)) as out:
        out.write(np.ones((300, 300), np.uint8), 1)
    with pytest.raises(KeyboardInterrupt), atomic_raster(target, grid.geotiff_profile("uint8", 255)) as out:
        out.write(np.zeros((300, 300), np.uint8), 1)
        raise KeyboardInterrupt
    with rasterio.open(target) as done:
        assert (done.read(1) == 1).all() and done.profile["tiled"] and done.compression.value == "DEFLATE"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]
