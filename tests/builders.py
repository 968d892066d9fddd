"""Hand-made tiny scenes in the extracted_data layout, for tests that need to know every pixel."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipeline.bands import AUX_FILES, BAND_RESOLUTION, BANDS
from pipeline.config import PipelineConfig, parse_config
from pipeline.data.tiles import tile_crs, tile_origin

TILE = "32TNS"


def _transform(tile: str, resolution: float) -> Affine:
    x, y = tile_origin(tile)
    return Affine(resolution, 0, x, 0, -resolution, y)


def write_raster(path: Path, array: np.ndarray, resolution: float, tile: str = TILE,
                 crs: CRS | None = None, driver: str = "GTiff", nodata: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"QUALITY": "100", "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    with rasterio.open(
        path, "w", driver=driver, width=array.shape[1], height=array.shape[0], count=1, dtype=array.dtype,
        crs=crs or tile_crs(tile), transform=_transform(tile, resolution), nodata=nodata, **options,
    ) as dst:
        dst.write(array, 1)
    return path


def band_shape(size: int, band: str) -> tuple[int, int]:
    n = math.ceil(size / (BAND_RESOLUTION[band] // 10))
    return n, n


def write_scene(root: Path, date: str = "20220301T102309", size: int = 60, baseline: str = "0400",
                mission: str = "S2B", tile: str = TILE, dn: dict[str, np.ndarray] | None = None,
                default_reflectance: float = 0.2, exolabs: np.ndarray | None = None,
                crs: CRS | None = None, skip_bands: tuple[str, ...] = ()) -> Path:
    """Write one SAFE product; `dn` overrides bands with given digital numbers at native resolution."""
    offset = 1000 if int(baseline) >= 400 else 0
    safe = root / f"{mission}_MSIL1C_{date}_N{baseline}_R022_T{tile}_{date[:8]}T150000.SAFE"
    img = safe / "GRANULE" / f"L1C_T{tile}_A030000_{date}" / "IMG_DATA"
    for band in BANDS:
        if band in skip_bands:
            continue
        values = (dn or {}).get(band)
        if values is None:
            value = round(default_reflectance * 10000) + offset
            values = np.full(band_shape(size, band), value, np.uint16)
        write_raster(img / f"T{tile}_{date}_{band}.jp2", values, BAND_RESOLUTION[band], tile, crs,
                     driver="JP2OpenJPEG")
    if exolabs is not None:
        day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
        write_raster(root / "ExoLabs_classification_S2" / f"S2_{tile}_{day}_classification.tif",
                     exolabs.astype(np.uint8), 10 * size / exolabs.shape[0], tile)
    return safe


def write_auxiliary(root: Path, size: int = 60, tile: str = TILE, **layers: np.ndarray) -> Path:
    """Write auxiliary layers (lakes at 10 m, the rest at 30 m unless their shape says otherwise)."""
    folder = root / f"{tile}_auxiliary_data"
    defaults = {
        "lakes": np.zeros((size, size), np.uint8),
        "surface_water": np.zeros((math.ceil(size / 3),) * 2, np.uint8),
        "glacier": np.zeros((math.ceil(size / 3),) * 2, np.uint8),
        "dem": np.full((math.ceil(size / 3),) * 2, 1500, np.int16),
    }
    for name, array in {**defaults, **layers}.items():
        write_raster(folder / f"{tile}_{AUX_FILES[name]}", array, 10 * size / array.shape[0], tile)
    return folder


def make_config(root: Path, **sections: dict | list) -> PipelineConfig:
    """A validated config whose paths point into `root` (extracted_data is `root` itself); a section is a dict
    of its keys, `dates` a list."""
    data: dict = {
        "tiles": [TILE],
        "paths": {"extracted_data": ".", "annotated_masks": "masks", "dataset": "dataset",
                  "results": "results", "work": "work"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return parse_config(data, root)


def write_dataset(folder: Path, train: int = 24, validation: int = 8, size: int = 32, channels: int = 14,
                  seed: int = 0) -> Path:
    """A learnable toy dataset in the dataset stage's format: the class is a function of two channels."""
    import json

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, n in (("train", train), ("validation", validation)):
        images = rng.normal(0, 0.5, (n, channels, size, size)).astype(np.float16)
        masks = ((images[:, 0] > 0).astype(np.uint8) + 2 * (images[:, 1] > 0.3)).astype(np.uint8)
        np.save(folder / f"{name}_images.npy", images)
        np.save(folder / f"{name}_masks.npy", masks)
        pixels = [int((masks == c).sum()) for c in range(4)]
        splits[name] = {"dates": [], "patches": n, "images": f"{name}_images.npy", "masks": f"{name}_masks.npy",
                        "class_pixels": pixels, "class_fraction": [p / sum(pixels) for p in pixels], "positions": []}
    names = [*BANDS, "DEM"][:channels]
    manifest = {"version": 1, "tiles": [TILE], "patch_size": size, "channels": names,
                "classes": ["background", "snow", "clouds", "water"], "split": "scene", "splits": splits,
                "normalisation": {"low": [0.1] * 13, "high": [0.3] * 13, "mean": [0.2] * 13, "low_percentile": 30,
                                  "high_percentile": 70, "dem_mean": 1500.0 if channels == 14 else None,
                                  "dem_scale": 500.0 if channels == 14 else None, "method": "log_percentile",
                                  "channels": names},
                "inputs": f"toy-{seed}", "config": "toy"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def sid(date: str, tile: str = TILE) -> str:
    """The scene id of a sensing time in a tile: what output folders, records and messages name a scene by."""
    return f"{tile}_{date}"
