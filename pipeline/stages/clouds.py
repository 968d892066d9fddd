"""s2cloudless cloud masks, computed window by window without seams, at 10 m or a coarser grid.

The detector's averaging disk (`average_over`) and dilation disk (`dilation_size`) are measured in 10 m
pixels (the thesis' units, at its 10 m grid), whatever the detector's grid: on a 20 m grid the averaging
disk has half the radius in detector pixels, so the masks cover the same ground (keeping the 10 m numbers
at 20 m doubled both disks and gave cloud IoU 0.79-0.90 against 10 m; scaled, 0.90-0.97: docs/benchmarks.md,
"Annotate"). Each window is read with a halo wider than both, so
the result inside it is exactly what a whole-scene run would give. On a coarser grid the averaged
probability is upsampled bilinearly to 10 m before thresholding and dilated at 10 m, so the mask has 10 m
edges.

No wasted pixels: the model (pipeline/stages/cloud_backend.py: compiled, or LightGBM) is handed only the 10
bands it uses (DETECTOR_BANDS; coverage still needs all 13, pipeline/stages/annotate.py) and only the pixels
where they have data. Every other pixel gets the fill value: the probability the same model gives a pixel of
zero reflectance, which is what it was handed there before (0.0 in every band; 0.00011 for s2cloudless 1.7.3's
model: clear), so masks are unchanged wherever the detector's pixels had data in all 13 bands or in none. On the 10 m
grid the 13 bands are read anyway (for coverage) and "data" means all 13, as before: the masks are identical.
On a coarser grid only the 10 bands are read and "data" means those 10: a pixel without data in B03, B06 or
B07 alone (no data in the final mask anyway) now gets its own probability instead of the fill value, which
can change the mask within the averaging disk's radius plus the dilation of such pixels, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from rasterio.windows import Window

from pipeline.bands import BANDS
from pipeline.config import CloudDetection
from pipeline.data.grid import Tile
from pipeline.data.normalise import reflectance as to_reflectance
from pipeline.data.reader import SceneReader
from pipeline.stages import cloud_backend

MAX_BLOCK = 2048  # 10 m pixels: keeps the 10 m layers of one window near 100 MB
# The bands s2cloudless's model reads, in its order (s2cloudless.utils.MODEL_BANDS; a test compares).
DETECTOR_BANDS: tuple[str, ...] = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
DETECTOR_INDEX = [BANDS.index(band) for band in DETECTOR_BANDS]
# Loaded models, one per backend, thread count and model file: a process annotating many scenes loads once.
_MODELS: dict[tuple[str, int, Path | None], tuple[cloud_backend.TreeModel, str]] = {}


def load_model(backend: str, threads: int, model_file: Path | None = None,
               say: Callable[[str], None] = print) -> tuple[cloud_backend.TreeModel, str]:
    """The tree model and the line saying which it is, said once per process when first loaded."""
    key = (backend, threads, model_file)
    if key not in _MODELS:
        _MODELS[key] = cloud_backend.load(backend, threads, model_file, say)
        say(f"cloud detector: {_MODELS[key][1]}")
    return _MODELS[key]


class CloudDetector:
    """One per process: loads s2cloudless's model once, compiled or through LightGBM (`backend` says which)."""

    # True: the model sees every pixel, no data included (the thesis' way: bench/annotate_speed.py's baseline).
    every_pixel = False

    def __init__(self, settings: CloudDetection, grid_resolution: float = 10.0, threads: int = 0,
                 model_file: Path | None = None, say: Callable[[str], None] = print) -> None:
        # Imported here: only the annotate stage needs s2cloudless (and LightGBM), not GPU jobs.
        from s2cloudless.utils import cv2_disk

        self.settings = settings
        self.factor = max(1, round(settings.resolution / grid_resolution))
        self.threads = threads
        self.model, self.backend = load_model(settings.backend, threads, model_file, say)
        self.fill = float(self.model.predict(np.zeros((1, len(DETECTOR_BANDS)), np.float32))[0])
        self._average = None
        self.average_radius = round(settings.average_over / self.factor)  # in detector pixels
        if self.average_radius:
            disk = cv2_disk(self.average_radius).astype(np.float32)
            self._average = disk / disk.sum()
        self._dilation = cv2_disk(settings.dilation_size) if settings.dilation_size else None

    @property
    def halo(self) -> int:
        """10 m pixels each window must read around itself so that no seam shows."""
        return (self.average_radius + 2) * self.factor + self.settings.dilation_size

    @property
    def block(self) -> int:
        """Core window size in 10 m pixels: `window` detector pixels, at most MAX_BLOCK (memory), a multiple
        of the detector's grid factor."""
        size = min(self.settings.window * self.factor, max(MAX_BLOCK, self.factor))
        return size - size % self.factor

    def probability(self, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Cloud probability (h, w) float32 from the DETECTOR_BANDS' reflectance (10, h, w) on the detector
        grid; the model sees the `valid` pixels, the others get `fill`."""
        pixels = np.moveaxis(bands, 0, -1)
        if self.every_pixel:
            return self.model.predict(pixels.reshape(-1, len(DETECTOR_BANDS))).reshape(valid.shape)
        prob = np.full(valid.shape, self.fill, np.float32)
        if valid.all():
            prob[:] = self.model.predict(pixels.reshape(-1, len(DETECTOR_BANDS))).reshape(valid.shape)
        elif valid.any():
            prob[valid] = self.model.predict(pixels[valid])
        return prob

    def read(self, reader: SceneReader, window: Window) -> tuple[np.ndarray, np.ndarray, bool]:
        """The DETECTOR_BANDS' reflectance (10, h, w) and where the detector has data, on its grid; the last
        value says whether that validity is the 13 bands' (10 m grid: all 13 read, coverage uses them)."""
        if self.factor == 1:
            reflectance, valid = reader.read_bands(window)
            return reflectance[DETECTOR_INDEX], valid, True
        bands, valid = to_reflectance([reader.read_band(band, window, self.factor) for band in DETECTOR_BANDS],
                                      reader.scene.dn_offset)
        return bands, valid, False

    def mask(self, reader: SceneReader, tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
        """Cloud mask (uint8 0/1) for the core of `tile`, whose padded window is aligned to the factor.

        Also returns the core's 10 m validity when it came with the read (detector grid = 10 m), else None.
        """
        f = self.factor
        padded = tile.padded
        coarse = Window(padded.col_off // f, padded.row_off // f, padded.width // f, padded.height // f)
        bands, valid, all_bands = self.read(reader, coarse)
        prob = self.probability(bands, valid)
        if self._average is not None:
            prob = cv2.filter2D(prob, -1, self._average, borderType=cv2.BORDER_REFLECT)
        if f > 1:
            prob = cv2.resize(prob, (int(padded.width), int(padded.height)), interpolation=cv2.INTER_LINEAR)
        mask: np.ndarray = (prob > self.settings.threshold).astype(np.uint8)  # cv2.dilate's result may replace it
        if self._dilation is not None:
            mask = cv2.dilate(mask, self._dilation)
        return mask[tile.inner], (valid[tile.inner] if all_bands else None)
