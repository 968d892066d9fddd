"""The static landscape of a demo tile: alpine DEM, lakes, rivers, glaciers and land cover.

Large-scale structure is made on the 30 m grid (the DEM's own) and upsampled, so a full tile is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.demo.noise import block_mean, fractal_noise, quantile, smooth_noise, upsample

# Land-cover materials; their spectra live in pipeline.demo.spectra.
MEADOW, FOREST, ROCK, ICE, WATER = 0, 1, 2, 3, 4
# A 5 km scene cannot hold 3 km of relief at real slopes: gradients are rescaled to this median slope.
MEDIAN_SLOPE_DEG = 22.0
LAKES_PER_KM2 = 0.35


@dataclass
class Terrain:
    """Everything that is the same in every scene. 30 m fields are float32, 10 m maps uint8/bool."""

    size: int
    dem: np.ndarray  # 30 m, metres
    slope: np.ndarray  # 30 m, degrees (after rescaling)
    gx: np.ndarray  # 30 m, dz/dx east (rescaled, unitless)
    gy: np.ndarray  # 30 m, dz/dy north
    lakes: np.ndarray  # 10 m bool: open water bodies (COP lakes)
    rivers: np.ndarray  # 30 m bool: rivers (in JRC surface water and in the truth)
    jrc_extra: np.ndarray  # 30 m bool: seasonal water that JRC knows but that is dry in these scenes
    glacier: np.ndarray  # 30 m bool: RGI outlines
    material: np.ndarray  # 10 m uint8: MEADOW..WATER
    texture: np.ndarray  # 10 m float32 around 1: brightness variability of the ground

    @property
    def shape10(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def water10(self) -> np.ndarray:
        """Water on the ground: the lakes and the rivers."""
        return self.lakes | upsample(self.rivers, 3, self.shape10, nearest=True)

    def surface_water30(self) -> np.ndarray:
        """What JRC maps: lakes with its own (30 m, slightly generous) shores, rivers, and seasonal extras."""
        lake_share = block_mean(self.lakes.astype(np.float32), 3, self.dem.shape)
        return (lake_share >= 0.4) | self.rivers | self.jrc_extra


def make_terrain(size: int, seed: int) -> Terrain:
    rng = np.random.default_rng([seed, 999_999])
    extent_km = size * 0.01
    n30 = math.ceil(size / 3)
    shape30 = (n30, n30)
    dem = _alpine_dem(rng, shape30, extent_km)
    lakes, levels = _lakes(rng, dem, size, extent_km)
    lake30 = block_mean(lakes.astype(np.float32), 3, shape30) >= 0.5
    dem[lake30] = levels[lake30]
    gx, gy, slope = _gradients(dem)
    valley = dem < quantile(dem, 0.3)
    rivers = _lines(rng, shape30, extent_km / 1.5, 0.035) & valley & ~lake30 & (slope < 25)
    jrc_extra = (smooth_noise(rng, shape30, extent_km * 4) > 2.9) & valley & ~rivers
    glacier_line = 2950 + 120 * fractal_noise(rng, shape30, extent_km / 2, 3)
    glacier = ndimage.binary_opening((dem > glacier_line) & (slope < 38), iterations=1)
    material = _land_cover(rng, dem, slope, size, extent_km)
    material[upsample(glacier, 3, (size, size), nearest=True)] = ICE
    material[lakes | upsample(rivers, 3, (size, size), nearest=True)] = WATER
    texture = np.float32(1) + np.float32(0.07) * fractal_noise(rng, (size, size), extent_km * 3, 5, gain=0.7)
    return Terrain(size, dem, slope, gx, gy, lakes, rivers, jrc_extra, glacier, material, texture)


def _alpine_dem(rng: np.random.Generator, shape: tuple[int, int], extent_km: float) -> np.ndarray:
    """Massifs (smooth), sharp ridges (1 - |noise|) and detail, mapped to roughly 500-4000 m."""
    massif = fractal_noise(rng, shape, max(2.0, extent_km / 8), 3)
    ridges = 1 - np.abs(fractal_noise(rng, shape, max(3.0, extent_km / 2.5), 6, gain=0.45))
    z = 0.8 * massif + 1.6 * ridges
    z += 0.25 * fractal_noise(rng, shape, max(6.0, extent_km * 2), 4)
    lo, hi = quantile(z, 0.005), quantile(z, 0.999)
    z = np.clip((z - lo) / (hi - lo), 0, 1.05)
    return (500 + 3400 * z**1.6).astype(np.float32)


def _gradients(dem: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    drow, dcol = np.gradient(dem, 30.0)
    gx, gy = dcol.astype(np.float32), (-drow).astype(np.float32)
    steepness = np.hypot(gx, gy)
    scale = np.float32(math.tan(math.radians(MEDIAN_SLOPE_DEG)) / max(float(np.median(steepness[::3, ::3])), 1e-6))
    gx *= scale
    gy *= scale
    slope = np.degrees(np.arctan(steepness * scale)).astype(np.float32)
    return gx, gy, slope


def _lakes(rng: np.random.Generator, dem: np.ndarray, size: int, extent_km: float) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic lakes with ragged shores at valley bottoms: the 10 m mask, and lake levels at 30 m."""
    relief = dem - ndimage.gaussian_filter(dem, sigma=max(4.0, dem.shape[0] / 12))
    candidates = np.flatnonzero(((relief < quantile(relief, 0.12)) & (dem < 2500)).ravel())
    count = max(3, round(LAKES_PER_KM2 * extent_km**2))
    seeds = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    lakes = np.zeros((size, size), bool)
    levels = np.zeros_like(dem)
    for seed in seeds:
        r30, c30 = divmod(int(seed), dem.shape[1])
        radius = rng.uniform(7, 22)
        half = int(radius * 1.6) + 2
        cy, cx = r30 * 3 + 1, c30 * 3 + 1
        y0, y1, x0, x1 = max(0, cy - half), min(size, cy + half), max(0, cx - half), min(size, cx + half)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        angle, ratio = rng.uniform(0, math.pi), rng.uniform(0.45, 1.0)
        u = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / radius
        v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / (radius * ratio)
        shore = np.hypot(u, v) + 0.18 * smooth_noise(rng, (y1 - y0, x1 - x0), 5)
        inside = shore < 1
        lakes[y0:y1, x0:x1] |= inside
        ys, xs = slice(y0 // 3, -(-y1 // 3)), slice(x0 // 3, -(-x1 // 3))
        levels[ys, xs] = np.where(levels[ys, xs] > 0, np.minimum(levels[ys, xs], dem[r30, c30]), dem[r30, c30])
    return lakes, levels


def _lines(rng: np.random.Generator, shape: tuple[int, int], cells: float, width: float) -> np.ndarray:
    """Meandering thin lines: the zero set of a smooth field."""
    field = fractal_noise(rng, shape, max(2.0, cells), 3, gain=0.4)
    return np.abs(field) < width


def _land_cover(
    rng: np.random.Generator, dem: np.ndarray, slope: np.ndarray, size: int, extent_km: float
) -> np.ndarray:
    """Forest low down, meadows up to ~2400 m, rock above and on steep slopes, with patchy edges."""
    shape10 = (size, size)
    dem10 = upsample(dem, 3, shape10)
    patch = fractal_noise(rng, shape10, extent_km * 1.5, 5)
    material = np.full(shape10, MEADOW, np.uint8)
    treeline = dem10 < 1850 + 150 * patch
    material[treeline & (patch > -0.3)] = FOREST
    del treeline
    rocky = (dem10 > 2350 + 200 * patch) | (upsample(slope, 3, shape10) > 38 + 6 * patch)
    material[rocky] = ROCK
    return material
