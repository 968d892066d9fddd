"""Atomic writers for the demo's GeoTIFFs and JPEG 2000 band files, on grids anchored at the tile's corner."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_origin

from pipeline.data.tiles import tile_crs, tile_origin


def grid_transform(tile: str, res: int) -> Affine:
    """Every grid of a tile shares the upper-left corner; only the pixel size differs."""
    x0, y0 = tile_origin(tile)
    return from_origin(x0, y0, res, res)


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling name and move it onto `path` only once it is completely written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_geotiff(path: Path, array: np.ndarray, tile: str, res: int, nodata: float | None = None) -> None:
    """Tiled (where the raster is big enough), deflate-compressed, georeferenced single-band GeoTIFF."""
    height, width = array.shape
    profile: dict = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=1,
        dtype=array.dtype.name,
        crs=tile_crs(tile),
        transform=grid_transform(tile, res),
        nodata=nodata,
        compress="deflate",
    )
    if min(height, width) >= 256:
        block = 512 if min(height, width) >= 512 else 256
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    with atomic(path) as partial, rasterio.open(partial, "w", **profile) as dst:
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
    with atomic(path) as partial, rasterio.open(partial, "w", **profile) as dst:
        dst.write(dn, 1)
