"""Per-scene fields (illumination, snow, clouds, swath) and what is rendered from them: band reflectances,
the true class map and the ExoLabs-like second opinion."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from pipeline.bands import (
    BAND_RESOLUTION,
    BASELINE_04_OFFSET,
    CLOUDS,
    EXO_BARE_SOIL,
    EXO_CLOUDS,
    EXO_DARK,
    EXO_GLACIER_ICE,
    EXO_NOT_OBSERVED,
    EXO_SNOW,
    EXO_VEGETATION,
    EXO_WATER,
    NODATA,
    QUANTIFICATION_VALUE,
    SNOW,
    WATER,
)
from pipeline.demo import spectra
from pipeline.demo.noise import block_mean, fractal_noise, quantile, upsample
from pipeline.demo.terrain import FOREST, MEADOW, ROCK, Terrain

# Opacity above which a pixel is "cloud" in the truth: where s2cloudless starts to see it (tuned).
CLOUD_TRUTH_ALPHA = 0.12
# ExoLabs only calls thick cloud "cloud"; thinner cloud keeps its ground class there.
EXO_CLOUD_ALPHA = 0.6
SNOW_EDGE_M = 90.0  # elevation span over which snow cover goes from 0 to 1
LATITUDE = 46.5


@dataclass(frozen=True)
class Swath:
    """The orbit's swath edge: a straight line cutting off one corner (no data beyond it)."""

    corner: int  # 0 upper-left, 1 upper-right, 2 lower-left, 3 lower-right
    a: float  # where the edge meets the horizontal side, as a fraction of the scene width
    b: float  # ... the vertical side

    def valid(self, size: int, res: int, shape: tuple[int, int]) -> np.ndarray:
        """Observed pixels of a grid at `res` metres; decided on pixel centres so all grids agree."""
        extent = size * 10.0
        u = (np.arange(shape[1], dtype=np.float32) + 0.5) * (res / extent)
        v = (np.arange(shape[0], dtype=np.float32) + 0.5) * (res / extent)
        if self.corner in (1, 3):
            u = 1 - u
        if self.corner in (2, 3):
            v = 1 - v
        return (u[None, :] / self.a + v[:, None] / self.b) >= 1


@dataclass(frozen=True)
class SceneSpec:
    seed: int
    index: int
    sensing: datetime
    baseline: str  # processing baseline, "N0301" or "N0400"
    snow_line: float  # metres
    snow_age: float  # 0 fresh .. 1 old
    cloud_cover: float  # fraction of the scene with opacity above CLOUD_TRUTH_ALPHA
    cirrus: bool
    swath: Swath

    @property
    def date_key(self) -> str:
        return self.sensing.strftime("%Y%m%dT%H%M%S")

    @property
    def offset(self) -> int:
        return BASELINE_04_OFFSET if self.baseline >= "N0400" else 0

    def rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, purpose])


@dataclass
class SceneFields:
    """10 m fields of one scene; bands, truth and ExoLabs are all derived from these."""

    spec: SceneSpec
    terrain: Terrain
    gain: np.ndarray  # illumination x ground texture
    snow_score: np.ndarray  # > 0 snow; snow fraction = clip(score + 0.5, 0, 1)
    alpha: np.ndarray  # cloud opacity 0..1
    cloud_light: np.ndarray  # alpha x cloud-top brightness
    cirrus: np.ndarray | None  # thin high-cloud opacity

    @property
    def size(self) -> int:
        return self.terrain.size


def make_fields(terrain: Terrain, spec: SceneSpec) -> SceneFields:
    extent_km = terrain.size * 0.01
    gain = upsample(_illumination(terrain, spec.sensing), 3, terrain.shape10)
    gain *= terrain.texture
    score = _snow_score(terrain, spec, extent_km)
    alpha, cloud_light, cirrus = _clouds(spec, terrain.shape10, extent_km)
    return SceneFields(spec, terrain, gain, score, alpha, cloud_light, cirrus)


def _clouds(
    spec: SceneSpec, shape: tuple[int, int], extent_km: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Opacity rising steeply from soft edges to opaque cores over `cloud_cover` of the scene, cloud-top
    brightness texture, and optionally a thin cirrus veil."""
    rng = spec.rng(2)
    field = fractal_noise(rng, shape, max(2.5, extent_km / 2.5), 7, gain=0.5)
    threshold = np.float32(quantile(field, 1 - spec.cloud_cover))
    alpha = np.clip(CLOUD_TRUTH_ALPHA + (field - threshold) * np.float32(0.8), 0, 1)
    del field
    cloud_light = np.float32(1) + np.float32(0.08) * fractal_noise(rng, shape, extent_km * 3, 5, gain=0.7)
    cloud_light *= alpha
    cirrus = None
    if spec.cirrus:
        # At most 0.06 opacity: thin enough that neither the truth nor s2cloudless calls it cloud.
        cirrus = np.clip(fractal_noise(rng, shape, max(2.0, extent_km / 3), 4) * np.float32(0.025), 0, 0.06)
    return alpha, cloud_light, cirrus


def _illumination(terrain: Terrain, sensing: datetime) -> np.ndarray:
    """Direct light on the slope relative to flat ground (plus a diffuse floor), on the 30 m grid."""
    elevation, azimuth = sun_position(sensing)
    sx = math.sin(azimuth) * math.cos(elevation)
    sy = math.cos(azimuth) * math.cos(elevation)
    sz = math.sin(elevation)
    cos_i = (-terrain.gx * sx - terrain.gy * sy + sz) / np.sqrt(1 + terrain.gx**2 + terrain.gy**2)
    return np.float32(0.22) + np.float32(0.78) * np.clip(cos_i / np.float32(sz), 0, 1.3)


def sun_position(sensing: datetime) -> tuple[float, float]:
    """Solar elevation and azimuth (radians from north) at 10:30 local solar time, the Sentinel-2 overpass."""
    day = sensing.timetuple().tm_yday
    declination = math.radians(-23.44 * math.cos(2 * math.pi * (day + 10) / 365))
    lat, hour_angle = math.radians(LATITUDE), math.radians(-22.5)
    sin_el = math.sin(lat) * math.sin(declination)
    sin_el += math.cos(lat) * math.cos(declination) * math.cos(hour_angle)
    elevation = math.asin(sin_el)
    cos_az = (math.sin(declination) - sin_el * math.sin(lat)) / (math.cos(elevation) * math.cos(lat))
    return elevation, math.acos(max(-1.0, min(1.0, cos_az)))  # morning: the sun is east of south


def _snow_score(terrain: Terrain, spec: SceneSpec, extent_km: float) -> np.ndarray:
    """Height above the snow line in SNOW_EDGE_M units: north faces hold snow longer, cliffs shed it."""
    northness = -terrain.gy / np.sqrt(1 + terrain.gx**2 + terrain.gy**2)
    potential = terrain.dem + 260 * northness - 30 * np.clip(terrain.slope - 40, 0, None)
    shape = terrain.shape10
    score = upsample(potential, 3, shape)
    score -= np.float32(spec.snow_line)
    water = terrain.water10
    frozen = score[water] > 200  # flat water bodies freeze whole, well above the snow line
    score += np.float32(120) * fractal_noise(spec.rng(1), shape, extent_km * 2, 6, gain=0.6)
    score /= np.float32(SNOW_EDGE_M)
    score[water] = np.where(frozen, 5, -5)
    return score


def band_reflectance(fields: SceneFields, band: str) -> np.ndarray:
    """TOA reflectance of one band on its native grid: ground, snow, cloud and cirrus, plus sensor noise.

    Written with in-place operations and one scratch buffer, so a full tile needs ~1 GB on top of the fields.
    """
    b = spectra.band_index(band)
    snow_b = np.float32(spectra.snow_spectrum(fields.spec.snow_age)[b])
    toa = spectra.SURFACE[:, b][fields.terrain.material]
    scratch = np.subtract(np.float32(0.5), fields.snow_score)
    np.clip(scratch, 0, 1, out=scratch)  # snow-free share of the pixel
    toa -= snow_b
    toa *= scratch
    toa += snow_b  # = ground x (1 - snow) + snow spectrum x snow
    toa *= fields.gain
    np.subtract(np.float32(1), fields.alpha, out=scratch)
    toa *= scratch
    np.multiply(fields.cloud_light, np.float32(spectra.CLOUD[b]), out=scratch)
    toa += scratch
    if fields.cirrus is not None:
        np.subtract(np.float32(1), fields.cirrus, out=scratch)
        toa *= scratch
        np.multiply(fields.cirrus, np.float32(spectra.CIRRUS[b]), out=scratch)
        toa += scratch
    del scratch
    factor = BAND_RESOLUTION[band] // 10
    native = -(-fields.size // factor)
    toa = block_mean(toa, factor, (native, native))
    rng = fields.spec.rng(100 + b)
    noise = rng.standard_normal(toa.shape, dtype=np.float32)
    noise *= toa
    noise *= np.float32(0.01)  # 1 % relative noise ...
    toa += noise
    rng.standard_normal(dtype=np.float32, out=noise)
    noise *= np.float32(0.001)  # ... plus a 0.001 floor
    toa += noise
    return toa


def band_valid(fields: SceneFields, band: str) -> np.ndarray:
    factor = BAND_RESOLUTION[band] // 10
    native = -(-fields.size // factor)
    return fields.spec.swath.valid(fields.size, 10 * factor, (native, native))


def to_dn(reflectance: np.ndarray, valid: np.ndarray, offset: int) -> np.ndarray:
    """L1C digital numbers: reflectance x 10000 (+ baseline offset), 1..65535 inside the swath, 0 outside."""
    dn = np.rint(reflectance * np.float32(QUANTIFICATION_VALUE))
    dn += np.float32(offset)
    np.clip(dn, 1, 65535, out=dn)
    dn[~valid] = 0
    return dn.astype(np.uint16)


def truth_map(fields: SceneFields) -> np.ndarray:
    """The true classes on the 10 m grid, priority clouds > snow (and glacier ice) > water > background."""
    terrain = fields.terrain
    truth = np.zeros(terrain.shape10, np.uint8)
    truth[terrain.water10] = WATER
    truth[fields.snow_score >= 0] = SNOW
    truth[upsample(terrain.glacier, 3, terrain.shape10, nearest=True)] = SNOW
    truth[fields.alpha >= CLOUD_TRUTH_ALPHA] = CLOUDS
    truth[~fields.spec.swath.valid(fields.size, 10, terrain.shape10)] = NODATA
    return truth


def exolabs_map(fields: SceneFields) -> np.ndarray:
    """A second opinion on the 20 m grid with its own snow edges and a thick-cloud-only cloud class."""
    terrain, extent_km = fields.terrain, fields.size * 0.01
    rng = fields.spec.rng(3)
    material = terrain.material[::2, ::2]
    shape20: tuple[int, int] = material.shape
    own = fractal_noise(rng, shape20, extent_km * 2, 6)
    exo = np.full(shape20, EXO_VEGETATION, np.uint8)
    exo[material == ROCK] = EXO_BARE_SOIL
    exo[(fields.gain[::2, ::2] < 0.4) & np.isin(material, (MEADOW, FOREST, ROCK))] = EXO_DARK
    exo[terrain.water10[::2, ::2]] = EXO_WATER
    exo[upsample(terrain.glacier, 3, terrain.shape10, nearest=True)[::2, ::2]] = EXO_GLACIER_ICE
    exo[fields.snow_score[::2, ::2] + np.float32(1.5) * own - np.float32(0.2) > 0] = EXO_SNOW
    exo[
        fields.alpha[::2, ::2] + np.float32(0.12) * fractal_noise(rng, shape20, extent_km, 4) > EXO_CLOUD_ALPHA
    ] = EXO_CLOUDS
    exo[~fields.spec.swath.valid(fields.size, 20, exo.shape)] = EXO_NOT_OBSERVED
    return exo
