"""What makes a class raster read as classes in a GIS: mask.tif and probabilities.tif as QGIS should show them.

Every `mask.tif` snowpipe writes (the annotate stage's and the infer stage's) carries the quicklook legend's
colours as its colour table (no data transparent), the class names (band description "class", dataset
tags CLASS_0=background ... CLASS_255=no data) and is a Cloud-Optimized GeoTIFF: tiled, with mode-resampled
overviews inside when it is larger than OVERVIEWS_ABOVE px on a side, so a full tile pans quickly.
`probabilities.tif` names its bands after the classes. The atomic writer (pipeline/data/writer.py) applies
the style by the file's name, so the stages only name their outputs; GDAL's COG driver cannot be written
window by window, so a COG is written as a tiled GeoTIFF first and copied (`write_cog`) before it is checked
(`cog_problems`) and published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil

from pipeline.bands import CLASS_COLOURS, CLASS_NAMES, NODATA

MASK_NAME = "mask.tif"
PROBABILITIES_NAME = "probabilities.tif"
OVERVIEWS_ABOVE = 2048  # px on the longer side; a smaller mask has no overviews
CLASS_BAND = "class"
NODATA_NAME = "no data"


def class_tags() -> dict[str, str]:
    """CLASS_<value>=<name> for every class and the no-data value."""
    return {**{f"CLASS_{value}": name for value, name in enumerate(CLASS_NAMES)}, f"CLASS_{NODATA}": NODATA_NAME}


def class_colormap() -> dict[int, tuple[int, int, int, int]]:
    """The quicklook legend's colours, opaque; no data transparent."""
    colours = {value: (*rgb, 255) for value, rgb in enumerate(CLASS_COLOURS)}
    return {**colours, NODATA: (0, 0, 0, 0)}


@dataclass(frozen=True)
class RasterStyle:
    """What a GIS needs to read a raster: band names, tags, a colour table, and whether it is published as COG."""

    descriptions: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    colormap: dict[int, tuple[int, int, int, int]] | None = None
    cog: bool = False

    def apply(self, dataset: Any) -> None:
        """Set the style on a raster open for writing (before its pixels are written)."""
        for band, description in enumerate(self.descriptions, 1):
            dataset.set_band_description(band, description)
        if self.tags:
            dataset.update_tags(**self.tags)
        if self.colormap is not None:
            dataset.write_colormap(1, self.colormap)


MASK_STYLE = RasterStyle((CLASS_BAND,), class_tags(), class_colormap(), cog=True)
PROBABILITIES_STYLE = RasterStyle(CLASS_NAMES, {"VALUES": "probability x 255"})


def raster_style(name: str, profile: dict[str, Any]) -> RasterStyle | None:
    """The style of a GeoTIFF named `name` with this profile: a class mask (one uint8 band), class
    probabilities (one band per class), else None."""
    if profile.get("driver") != "GTiff" or profile.get("dtype") != "uint8":
        return None
    count = int(profile.get("count", 1))
    if name == MASK_NAME and count == 1:
        return MASK_STYLE
    if name == PROBABILITIES_NAME and count == len(CLASS_NAMES):
        return PROBABILITIES_STYLE
    return None


def needs_overviews(width: int, height: int) -> bool:
    return max(width, height) > OVERVIEWS_ABOVE


def write_cog(source: Path, target: Path, profile: dict[str, Any]) -> None:
    """Copy the closed, tiled GeoTIFF `source` to `target` as a Cloud-Optimized GeoTIFF: same blocks and
    compression, colour table and metadata kept, overviews by the mode (always a class, never a blend) when
    larger than OVERVIEWS_ABOVE px. GDAL reads `source` block by block: memory does not grow with the size."""
    overviews = needs_overviews(int(profile["width"]), int(profile["height"]))
    rasterio.shutil.copy(
        source, target, driver="COG",
        COMPRESS=str(profile.get("compress", "deflate")).upper(),
        BLOCKSIZE=int(profile.get("blockxsize", 512)),
        OVERVIEWS="AUTO" if overviews else "NONE",
        OVERVIEW_RESAMPLING="MODE",
    )


def cog_problems(path: Path) -> list[str]:
    """Why the raster at `path` is not a Cloud-Optimized GeoTIFF with its overviews (empty when it is): it must
    be tiled, laid out as GDAL's COG driver writes it (IMAGE_STRUCTURE LAYOUT=COG: header and IFDs first,
    overviews before the full resolution) and, above OVERVIEWS_ABOVE px, have internal overviews."""
    problems = []
    with rasterio.open(path) as ds:
        if ds.driver != "GTiff":
            problems.append(f"it is {ds.driver}, not a GeoTIFF")
        # One tile as large as the raster (a 512 px mask in 512 px tiles) is tiled too, though GDAL reports it not.
        if not ds.profile.get("tiled") and ds.block_shapes[0] != (ds.height, ds.width):
            problems.append("it is not tiled")
        layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
        if layout != "COG":
            problems.append(f"its layout is {layout or 'not stated'}, not COG")
        if needs_overviews(ds.width, ds.height) and not ds.overviews(1):
            problems.append(f"it is {ds.width}x{ds.height} px but has no overviews")
    if path.with_name(path.name + ".ovr").exists():
        problems.append("its overviews are in a separate .ovr file, not inside it")
    return problems
