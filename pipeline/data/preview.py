"""PNG quicklooks: true colour beside the class mask, where a person would rather look than read."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from pipeline.bands import BANDS, NODATA
from pipeline.bands import CLASS_COLOURS as CLASS_RGB
from pipeline.data.normalise import reflectance as to_reflectance
from pipeline.data.reader import SceneReader
from pipeline.data.writer import atomic_raster

# background, snow, clouds, water (pipeline/bands.py, as mask.tif's colour table); no data is black.
CLASS_COLOURS = np.array(CLASS_RGB, np.uint8)
MAX_SIDE = 1024
RGB = ("B04", "B03", "B02")


def true_colour(reflectance: np.ndarray, top: float = 1.0, gamma: float = 0.5) -> np.ndarray:
    """(3, h, w) uint8 from B04, B03, B02 reflectance; the gamma keeps dark valleys and bright snow apart."""
    return picture_bytes(reflectance[[BANDS.index(band) for band in RGB]], top, gamma)


def picture_bytes(rgb: np.ndarray, top: float = 1.0, gamma: float = 0.5) -> np.ndarray:
    """(3, h, w) uint8 from the reflectance of B04, B03, B02 (3, h, w)."""
    return (np.clip(rgb / top, 0, 1) ** gamma * 255).astype(np.uint8)


def colourise(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((3, *mask.shape), np.uint8)
    for cls, colour in enumerate(CLASS_COLOURS):
        out[:, mask == cls] = colour[:, None]
    return out


def write_png(target: Path, image: np.ndarray) -> None:
    """A (3, h, w) uint8 picture as PNG; written, closed and read back before it takes its name, so a full
    disk is one OutputError and never a truncated image (GDAL writes the whole PNG when it is closed)."""
    profile = {"driver": "PNG", "width": image.shape[2], "height": image.shape[1], "count": 3, "dtype": "uint8"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a picture, not a raster
        with atomic_raster(target, profile) as png:
            png.write(image)


def write_mask_preview(target: Path, reader: SceneReader, mask_path: Path) -> None:
    """True colour (left) and mask (right), at most MAX_SIDE px high, read decimated (cheap): only the three
    bands of the picture (the other ten cost as much again as annotating a small scene), black where they
    have no data."""
    grid = reader.grid
    factor = max(1, math.ceil(max(grid.width, grid.height) / MAX_SIDE))
    coarse = grid.scaled(factor)
    window = Window(0, 0, coarse.width, coarse.height)
    picture, valid = to_reflectance([reader.read_band(band, window, factor) for band in RGB],
                                    reader.scene.dn_offset)
    with rasterio.open(mask_path) as src:
        mask = src.read(1, out_shape=(coarse.height, coarse.width), resampling=Resampling.nearest)
    rgb = picture_bytes(picture)
    rgb[:, ~valid] = 0
    classes = colourise(mask)
    classes[:, mask == NODATA] = 0
    gap = np.full((3, coarse.height, 8), 255, np.uint8)
    write_png(target, np.concatenate([rgb, gap, classes], axis=2))
