"""The scene's 10 m grid, coarser versions of it, and the windows stages iterate over."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: every raster snowpipe writes uses the scene's 10 m one."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def resolution(self) -> float:
        return abs(self.transform.a)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a north-up grid, as rasterio's dataset.bounds."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))

    def scaled(self, factor: int) -> Grid:
        """The grid with pixels `factor` times larger; it covers the scene (the last pixel may overhang)."""
        if factor == 1:
            return self
        return Grid(
            self.crs,
            self.transform @ Affine.scale(factor),
            math.ceil(self.width / factor),
            math.ceil(self.height / factor),
        )

    def geotiff_profile(self, dtype: str, nodata: float | None, count: int = 1) -> dict:
        """Tiled, compressed GeoTIFF on this grid (the format of every raster snowpipe writes)."""
        profile = {
            "driver": "GTiff",
            "dtype": dtype,
            "count": count,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "transform": self.transform,
            "compress": "deflate",
            "nodata": nodata,
            "tiled": True,
        }
        profile["blockxsize"] = profile["blockysize"] = 512 if min(self.width, self.height) >= 512 else 256
        return profile


@dataclass(frozen=True)
class Tile:
    """A block of the grid: `core` is what the block writes, `padded` what it must read around it."""

    core: Window
    padded: Window

    @property
    def inner(self) -> tuple[slice, slice]:
        """Where the core lies inside an array read for `padded`."""
        r0 = int(self.core.row_off - self.padded.row_off)
        c0 = int(self.core.col_off - self.padded.col_off)
        return slice(r0, r0 + int(self.core.height)), slice(c0, c0 + int(self.core.width))


def iter_tiles(height: int, width: int, size: int, halo: int = 0, align: int = 1) -> Iterator[Tile]:
    """Cover a height x width grid with size x size blocks, each padded by `halo` (clipped to the grid).

    With `align` > 1 the padded windows start and end on multiples of `align` (where the grid allows),
    so a grid `align` times coarser can be read for exactly the same area.
    """
    size = max(align, size - size % align)
    for row in range(0, height, size):
        for col in range(0, width, size):
            h, w = min(size, height - row), min(size, width - col)
            r0 = max(0, row - halo) // align * align
            c0 = max(0, col - halo) // align * align
            r1 = min(math.ceil((row + h + halo) / align) * align, math.ceil(height / align) * align)
            c1 = min(math.ceil((col + w + halo) / align) * align, math.ceil(width / align) * align)
            yield Tile(Window(col, row, w, h), Window(c0, r0, c1 - c0, r1 - r0))
