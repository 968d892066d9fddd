"""Digital numbers to reflectance; log-percentile normalisation of the bands (the thesis' "Dynamic World"
method) and DEM scaling.

Per band: x = log10(reflectance); the low and high percentiles of the training pixels map to
sigmoid(-1.7346) = 0.15 and sigmoid(+1.7346) = 0.85; the band mean is shifted to 0. Values lie in
(-1, 1). Constants are fitted on the training split only and stored in the dataset manifest, so
inference applies exactly what training saw. The DEM is standardised by its training mean and spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.bands import BANDS, QUANTIFICATION_VALUE

SPREAD = 1.7346  # sigmoid(1.7346) = 0.85
FLOOR = 1e-4  # 1 DN: log10 needs a positive reflectance (dark or offset-corrected pixels can be <= 0)


def _log(values: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(values, FLOOR))


def reflectance(dns: list[np.ndarray] | np.ndarray, dn_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-of-atmosphere reflectance (13, h, w) float32 and validity (h, w) bool from the 13 bands' DN.

    DN are converted as real products require: (DN - offset) / 10000 in floating point, where the
    offset is 1000 from processing baseline 04.00 on. DN 0 is no-data: reflectance 0, not valid.
    """
    out = np.zeros((len(dns), *dns[0].shape), np.float32)
    valid = np.ones(dns[0].shape, bool)
    for i, dn in enumerate(dns):
        band_valid = dn > 0
        valid &= band_valid
        np.subtract(dn, dn_offset, out=out[i], dtype=np.float32, where=band_valid)
    out /= QUANTIFICATION_VALUE
    out[:, ~valid] = 0.0
    return out, valid


@dataclass(frozen=True)
class Normaliser:
    low: list[float]  # per band reflectance at the low percentile
    high: list[float]
    mean: list[float]
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    dem_mean: float | None = None
    dem_scale: float | None = None
    method: str = "log_percentile"

    @classmethod
    def fit(cls, bands: np.ndarray, dem: np.ndarray | None, low_percentile: float = 2.0,
            high_percentile: float = 98.0) -> Normaliser:
        """Fit on sampled training pixels: bands (13, n) reflectance, dem (n,) metres or None."""
        low = np.percentile(bands, low_percentile, axis=1)
        high = np.percentile(bands, high_percentile, axis=1)
        high = np.maximum(high, low * 1.01 + FLOOR)  # a constant band must not divide by zero
        mean = bands.mean(axis=1)
        dem_mean = dem_scale = None
        if dem is not None:
            dem_mean, dem_scale = float(dem.mean()), float(max(dem.std(), 1.0))
        return cls([float(v) for v in np.maximum(low, FLOOR)], [float(v) for v in high],
                   [float(v) for v in np.maximum(mean, FLOOR)], low_percentile, high_percentile,
                   dem_mean, dem_scale)

    def _sigmoid_of_log(self, log_values: np.ndarray) -> np.ndarray:
        lo = _log(np.asarray(self.low, np.float32))[:, None, None]
        hi = _log(np.asarray(self.high, np.float32))[:, None, None]
        mapped = (log_values - lo) * (2 * SPREAD / (hi - lo)) - SPREAD
        return 1.0 / (1.0 + np.exp(-mapped))

    def _bands(self, bands: np.ndarray) -> np.ndarray:
        if bands.shape[0] != len(BANDS):
            raise ValueError(f"expected {len(BANDS)} bands, got {bands.shape[0]}")
        offset = self._sigmoid_of_log(_log(np.asarray(self.mean, np.float32))[:, None, None])
        return (self._sigmoid_of_log(_log(bands.astype(np.float32))) - offset).astype(np.float32)

    def _dem(self, dem: np.ndarray | None) -> np.ndarray:
        if dem is None:
            raise ValueError("this normaliser expects a DEM channel")
        assert self.dem_mean is not None and self.dem_scale is not None
        return ((dem.astype(np.float32) - self.dem_mean) / self.dem_scale).astype(np.float32)

    def apply(self, bands: np.ndarray, dem: np.ndarray | None = None) -> np.ndarray:
        """Normalised channels (13 or 14, h, w) float32 from reflectance (13, h, w) and DEM (h, w)."""
        out = self._bands(bands)
        if self.dem_mean is None:
            return out
        return np.concatenate([out, self._dem(dem)[None]])

    def dn_tables(self, dn_offset: int) -> np.ndarray:
        """The normalised value of every possible digital number, per band: (13, 65536) float32.

        Reflectance, logarithm and sigmoid depend on one band's DN alone, so normalising a scene's uint16
        bands is one table lookup per pixel and band (apply_dn), about 10x cheaper than computing them.
        """
        every_dn, _ = reflectance([np.arange(2**16, dtype=np.uint16)], dn_offset)
        return self._bands(np.broadcast_to(every_dn, (len(BANDS), 2**16))[:, None])[:, 0]

    def apply_dn(self, dn: np.ndarray, tables: np.ndarray,
                 dem: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised channels and validity from the 13 bands' DN (13, h, w) uint16 through `dn_tables`:
        the same as apply(*reflectance(dn)); a pixel where any band has DN 0 is no data in every band."""
        valid = dn.min(axis=0) > 0
        dn = dn * valid  # DN 0 in every band where one band has no data: the tables' no-data value
        out = np.empty((len(self.channels), *dn.shape[1:]), np.float32)
        for i in range(len(BANDS)):
            np.take(tables[i], dn[i], out=out[i])
        if self.dem_mean is not None:
            out[len(BANDS)] = self._dem(dem)
        return out, valid

    @property
    def channels(self) -> list[str]:
        return [*BANDS, "DEM"] if self.dem_mean is not None else list(BANDS)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": self.channels}

    @classmethod
    def from_dict(cls, data: dict) -> Normaliser:
        return cls(**{k: v for k, v in data.items() if k != "channels"})
