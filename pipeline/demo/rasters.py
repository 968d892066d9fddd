"""Atomic writers for the demo's GeoTIFFs and JPEG 2000 band files, on grids anchored at the tile's corner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from pipeline.data.grid import Grid
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.data.writer import atomic_path, atomic_raster


def grid_transform(tile: str, res: int) -> Affine:
    """Every grid of a tile shares the upper-left corner; only the pixel size differs."""
    x0, y0 = tile_origin(tile)
    return Affine(res, 0.0, x0, 0.0, -res, y0)


def write_geotiff(path: Path, array: np.ndarray, tile: str, res: int, nodata: float | None = None) -> None:
    """A single-band GeoTIFF in the format of every raster snowpipe writes (tiled, deflate, atomic)."""
    grid = Grid(tile_crs(tile), grid_transform(tile, res), array.shape[1], array.shape[0])
    with atomic_raster(path, grid.geotiff_profile(array.dtype.name, nodata)) as dst:
        dst.write(array, 1)


def write_jp2(path: Path, dn: np.ndarray, tile: str, res: int) -> None:
    """Lossless JPEG 2000 like an L1C band file: uint16, 1024 px code-blocks, no-data by convention (DN 0)."""
    height, width = dn.shape
    profile = dict(
        driver="JP2OpenJPEG",
        width=width,
        height=height,
        count=1,
        dtype="uint16",
        crs=tile_crs(tile),
        transform=grid_transform(tile, res),
        CODEC="JP2",
        QUALITY=100,
        REVERSIBLE="YES",
        BLOCKXSIZE=min(1024, max(32, width)),  # OpenJPEG needs at least 32 px code-blocks
        BLOCKYSIZE=min(1024, max(32, height)),
    )
    with atomic_path(path) as partial, rasterio.open(partial, "w", **profile) as dst:
        dst.write(dn, 1)
