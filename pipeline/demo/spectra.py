"""Top-of-atmosphere reflectance spectra of the demo materials, in pipeline.bands.BANDS order.

Values follow typical Sentinel-2 L1C numbers over the Alps: snow is bright in the visible and dark in SWIR
(B11/B12), clouds are bright in both, water is dark beyond red; B09 (water vapour) and B10 (cirrus) stay low
over the surface. TOA visible values include the atmosphere's path radiance (hence the raised B01/B02).
"""

from __future__ import annotations

import numpy as np

from pipeline.bands import BANDS
from pipeline.demo.terrain import FOREST, ICE, MEADOW, ROCK, WATER

#                     B01    B02    B03    B04    B05    B06    B07    B08    B8A    B09    B10    B11    B12
_MEADOW = (0.125, 0.095, 0.085, 0.075, 0.105, 0.165, 0.190, 0.205, 0.215, 0.070, 0.0030, 0.200, 0.120)
_FOREST = (0.115, 0.080, 0.065, 0.045, 0.070, 0.140, 0.170, 0.190, 0.200, 0.062, 0.0025, 0.110, 0.055)
_ROCK = (0.150, 0.130, 0.140, 0.160, 0.180, 0.200, 0.215, 0.230, 0.240, 0.080, 0.0040, 0.290, 0.230)
_ICE = (0.520, 0.490, 0.450, 0.390, 0.350, 0.300, 0.270, 0.240, 0.210, 0.090, 0.0040, 0.020, 0.015)
_WATER = (0.115, 0.085, 0.065, 0.040, 0.032, 0.025, 0.022, 0.018, 0.016, 0.006, 0.0015, 0.008, 0.005)
FRESH_SNOW = (0.880, 0.860, 0.840, 0.815, 0.800, 0.770, 0.740, 0.710, 0.670, 0.250, 0.0100, 0.068, 0.048)
OLD_SNOW = (0.760, 0.740, 0.720, 0.690, 0.670, 0.630, 0.600, 0.570, 0.530, 0.190, 0.0080, 0.035, 0.025)
# Thick water cloud seen from above: flat, bright visible/NIR, still bright in SWIR, some cirrus-band signal.
CLOUD = (0.560, 0.530, 0.510, 0.500, 0.505, 0.510, 0.510, 0.510, 0.500, 0.240, 0.0350, 0.430, 0.290)
# Per unit opacity of a thin ice cloud high up: strong in B10, weak everywhere else.
CIRRUS = (0.300, 0.280, 0.270, 0.260, 0.260, 0.260, 0.260, 0.255, 0.250, 0.150, 0.1600, 0.250, 0.180)

# Row = terrain material id.
SURFACE = np.array([_MEADOW, _FOREST, _ROCK, _ICE, _WATER], np.float32)
assert [MEADOW, FOREST, ROCK, ICE, WATER] == list(range(len(SURFACE)))


def snow_spectrum(age: float) -> np.ndarray:
    """Snow from fresh (age 0) to old, coarse-grained spring snow (age 1)."""
    return ((1 - age) * np.array(FRESH_SNOW, np.float32) + age * np.array(OLD_SNOW, np.float32)).astype(
        np.float32
    )


def band_index(band: str) -> int:
    return BANDS.index(band)
