"""The demo-data generator: plans a season of scenes and writes them in the extracted_data layout."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.bands import AUX_FILES, BAND_RESOLUTION, BANDS, NODATA
from pipeline.data.layout import scene_id
from pipeline.data.tiles import is_tile_id
from pipeline.demo.rasters import write_geotiff, write_jp2
from pipeline.demo.render import (
    SceneSpec,
    Swath,
    band_reflectance,
    band_valid,
    exolabs_map,
    make_fields,
    to_dn,
    truth_map,
)
from pipeline.demo.terrain import Terrain, make_terrain
from pipeline.errors import SnowpipeError

FIRST_SENSING = datetime(2021, 12, 20, 10, 23, 9)
BASELINE_04_START = datetime(2022, 1, 25)
SEASON_DAYS = 160  # December to late May
RELATIVE_ORBIT = 65
MAX_SIZE = 10980


def plan_scenes(count: int, seed: int) -> list[SceneSpec]:
    """Scenes every ~3 weeks from late December: both processing baselines, a snow line rising into spring.

    At least a day apart: past SEASON_DAYS + 1 scenes, one a day and the next ones in the following seasons
    (a year later each), so that no two scenes share a date (they would overwrite each other)."""
    per_season = SEASON_DAYS + 1
    step = max(1, min(24, SEASON_DAYS // max(1, count - 1)))
    specs = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        season, day = divmod(index, per_season) if count > per_season else (0, index)
        start = FIRST_SENSING.replace(year=FIRST_SENSING.year + season)
        sensing = start + timedelta(days=day * step, seconds=int(rng.integers(0, 120)))
        spring = min(1.0, max(0.0, (sensing - datetime(2022 + season, 1, 15)).days / 120))
        fraction, ratio = rng.uniform(0.05, 0.25), math.exp(rng.uniform(math.log(0.5), math.log(2)))
        specs.append(
            SceneSpec(
                seed=seed,
                index=index,
                sensing=sensing,
                baseline="N0301" if sensing < BASELINE_04_START else "N0400",
                snow_line=1400 + 1200 * spring**1.3 + rng.normal(0, 80),
                snow_age=min(1.0, 0.15 + 0.7 * spring + rng.uniform(0, 0.15)),
                cloud_cover=rng.uniform(0.12, 0.45),
                cirrus=bool(rng.random() < 0.4),
                swath=Swath(
                    int(rng.integers(4)), math.sqrt(2 * fraction * ratio), math.sqrt(2 * fraction / ratio)
                ),
            )
        )
    return specs


@dataclass
class DemoSummary:
    out: Path
    tiles: list[str]
    size: int
    dates: list[str]  # the sensing times, shared by every tile (as one pass's tiles share them)

    @property
    def scene_ids(self) -> list[str]:
        return [scene_id(tile, date) for tile in self.tiles for date in self.dates]


def generate_demo(
    out: Path,
    *,
    scenes: int = 3,
    size: int = 480,
    tiles: Sequence[str] = ("32TNS",),
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    band_format: Literal["jp2", "tif"] = "jp2",
) -> DemoSummary:
    """Write OUT/extracted_data (auxiliary layers, ExoLabs, L1C SAFE folders) and OUT/truth/.

    Every tile gets `scenes` scenes on the same sensing times (one pass covers neighbouring tiles at once) over
    terrain of its own; `progress` is called per scene written, with its scene id.

    band_format "tif" writes the bands as GeoTIFFs instead of JPEG 2000 (what readers accept too): minutes
    faster for full tiles, for benchmarks of what comes after decoding (bench/infer_efficiency.py on a GPU).
    """
    if scenes < 1:
        raise SnowpipeError(f"demo-data: --scenes must be at least 1, got {scenes}")
    if not 60 <= size <= MAX_SIZE:
        raise SnowpipeError(
            f"demo-data: --size must be between 60 and {MAX_SIZE} px (a full tile), got {size}"
        )
    tiles = list(tiles)
    wrong = [tile for tile in tiles if not is_tile_id(tile)]
    if wrong or not tiles or len(set(tiles)) != len(tiles):
        raise SnowpipeError(f"demo-data: --tiles must be distinct Sentinel-2 tile ids such as 32TNS,32TMS, got "
                            f"{','.join(tiles)!r}")
    out = Path(out)
    extracted = out / "extracted_data"
    specs = plan_scenes(scenes, seed)
    done = 0
    for number, tile in enumerate(tiles):
        terrain = make_terrain(size, seed + 7919 * number)  # the first tile keeps the one-tile demo's terrain
        _write_auxiliary(extracted / f"{tile}_auxiliary_data", terrain, tile)
        for spec in specs:
            _write_scene(out, terrain, spec, tile, band_format)
            done += 1
            if progress is not None:
                progress(done, len(specs) * len(tiles), scene_id(tile, spec.date_key))
    return DemoSummary(out=out, tiles=tiles, size=size, dates=[spec.date_key for spec in specs])


def _write_auxiliary(folder: Path, terrain: Terrain, tile: str) -> None:
    write_geotiff(folder / f"{tile}_{AUX_FILES['lakes']}", terrain.lakes.astype(np.uint8), tile, 10)
    write_geotiff(
        folder / f"{tile}_{AUX_FILES['surface_water']}", terrain.surface_water30().astype(np.uint8), tile, 30
    )
    write_geotiff(folder / f"{tile}_{AUX_FILES['glacier']}", terrain.glacier.astype(np.uint8), tile, 30)
    write_geotiff(folder / f"{tile}_{AUX_FILES['dem']}", np.rint(terrain.dem).astype(np.int16), tile, 30)


def _write_scene(out: Path, terrain: Terrain, spec: SceneSpec, tile: str, band_format: str = "jp2") -> None:
    """Truth and ExoLabs first, the SAFE folder last and in one rename: a visible SAFE means a whole scene."""
    fields = make_fields(terrain, spec)
    write_geotiff(out / "truth" / f"{scene_id(tile, spec.date_key)}.tif", truth_map(fields), tile, 10, nodata=NODATA)
    day = spec.sensing.strftime("%Y-%m-%d")
    exo_path = out / "extracted_data" / "ExoLabs_classification_S2" / f"S2_{tile}_{day}_classification.tif"
    write_geotiff(exo_path, exolabs_map(fields), tile, 20)
    safe = out / "extracted_data" / safe_name(spec, tile)
    partial = safe.with_name(f".{safe.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    img_data = partial / "GRANULE" / granule_name(spec, tile) / "IMG_DATA"
    for band in BANDS:
        dn = to_dn(band_reflectance(fields, band), band_valid(fields, band), spec.offset)
        path = img_data / f"T{tile}_{spec.date_key}_{band}.{band_format}"
        if band_format == "jp2":
            write_jp2(path, dn, tile, BAND_RESOLUTION[band])
        else:
            write_geotiff(path, dn, tile, BAND_RESOLUTION[band])
    shutil.rmtree(safe, ignore_errors=True)
    os.replace(partial, safe)


def satellite(spec: SceneSpec) -> str:
    return "S2A" if spec.index % 2 == 0 else "S2B"


def safe_name(spec: SceneSpec, tile: str) -> str:
    processed = (spec.sensing + timedelta(hours=2, minutes=4)).strftime("%Y%m%dT%H%M%S")
    mission = f"{satellite(spec)}_MSIL1C_{spec.date_key}_{spec.baseline}_R{RELATIVE_ORBIT:03d}"
    return f"{mission}_T{tile}_{processed}.SAFE"


def granule_name(spec: SceneSpec, tile: str) -> str:
    """Absolute orbit from the satellite's orbit count (about 14.3 orbits a day)."""
    first_orbit = 33_950 if satellite(spec) == "S2A" else 25_120
    absolute = first_orbit + round((spec.sensing - FIRST_SENSING).total_seconds() / 86400 * 14.3)
    return f"L1C_T{tile}_A{absolute:06d}_{spec.date_key}"
