"""Sentinel-2 and class constants shared by readers, stages and the demo generator."""

from __future__ import annotations

# The 13 L1C bands in the order every array in snowpipe uses (and s2cloudless expects).
BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)
# Native ground sampling distance in metres.
BAND_RESOLUTION: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}
# Digital numbers are reflectance x 10000; from processing baseline 04.00 on, DN carry +1000.
QUANTIFICATION_VALUE = 10000.0
BASELINE_04_OFFSET = 1000

# Mask classes everywhere in snowpipe.
BACKGROUND, SNOW, CLOUDS, WATER = 0, 1, 2, 3
CLASS_NAMES: tuple[str, ...] = ("background", "snow", "clouds", "water")
NODATA = 255
# The legend's colours (RGB), one per class: quicklooks, previews and mask.tif's colour table.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = ((34, 120, 34), (0, 220, 255), (255, 0, 200), (20, 40, 220))

# ExoLabs 9-class ground classification (band 1).
EXO_NOT_OBSERVED, EXO_NO_DATA, EXO_DARK, EXO_CLOUDS, EXO_SNOW = 0, 1, 2, 3, 4
EXO_VEGETATION, EXO_WATER, EXO_BARE_SOIL, EXO_GLACIER_ICE = 5, 6, 7, 8

# Auxiliary rasters inside {TILE}_auxiliary_data/ (file name suffixes after "{TILE}_").
AUX_FILES: dict[str, str] = {
    "lakes": "10m_COP_Lakes.tif",
    "surface_water": "30m_JRC_surfaceWater.tif",
    "glacier": "30m_Glacier_RGIv6.tif",
    "dem": "30m_DEM_AW3D30.tif",
    "tree_canopy": "30m_treeCanopyCover.tif",
}
