"""s2cloudless cloud masks, computed window by window without seams, at 10 m or a coarser grid.

The detector's averaging disk (`average_over`) and dilation disk (`dilation_size`) are measured in 10 m
pixels (the thesis' units, at its 10 m grid), whatever the detector's grid: on a 20 m grid the averaging
disk has half the radius in detector pixels, so the masks cover the same ground (keeping the 10 m numbers
at 20 m doubled both disks and gave cloud IoU 0.79-0.90 against 10 m; scaled, 0.90-0.97: docs/benchmarks.md,
"Annotate"). Each window is read with a halo wider than both, so
the result inside it is exactly what a whole-scene run would give. On a coarser grid the averaged
probability is upsampled bilinearly to 10 m before thresholding and dilated at 10 m, so the mask has 10 m
edges.
"""

from __future__ import annotations

import cv2
import numpy as np
from rasterio.windows import Window

from pipeline.config import CloudDetection
from pipeline.data.grid import Tile
from pipeline.data.reader import SceneReader

MAX_BLOCK = 2048  # 10 m pixels: keeps the 10 m layers of one window near 100 MB


class CloudDetector:
    """One per process: loads the LightGBM model shipped in the s2cloudless wheel once."""

    def __init__(self, settings: CloudDetection, grid_resolution: float = 10.0, threads: int = 0) -> None:
        # Imported here: only the annotate stage needs s2cloudless (and LightGBM), not GPU jobs.
        from s2cloudless import S2PixelCloudDetector
        from s2cloudless.utils import cv2_disk

        self.settings = settings
        self.factor = max(1, round(settings.resolution / grid_resolution))
        self.threads = threads
        self._detector = S2PixelCloudDetector(
            threshold=settings.threshold, average_over=0, dilation_size=0, all_bands=True
        )
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

    def probability(self, reflectance: np.ndarray) -> np.ndarray:
        """Per-pixel cloud probability (h, w) for reflectance (13, h, w) on the detector grid."""
        kwargs = {"num_threads": self.threads} if self.threads else {}
        cube = np.ascontiguousarray(reflectance.transpose(1, 2, 0))[None]
        return self._detector.get_cloud_probability_maps(cube, **kwargs)[0]

    def mask(self, reader: SceneReader, tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
        """Cloud mask (uint8 0/1) for the core of `tile`, whose padded window is aligned to the factor.

        Also returns the core's 10 m validity when it came with the read (detector grid = 10 m), else None.
        """
        f = self.factor
        padded = tile.padded
        coarse = Window(padded.col_off // f, padded.row_off // f, padded.width // f, padded.height // f)
        reflectance, valid = reader.read_bands(coarse, factor=f)
        prob = self.probability(reflectance)
        if self._average is not None:
            prob = cv2.filter2D(prob, -1, self._average, borderType=cv2.BORDER_REFLECT)
        if f > 1:
            prob = cv2.resize(prob, (int(padded.width), int(padded.height)), interpolation=cv2.INTER_LINEAR)
        mask: np.ndarray = (prob > self.settings.threshold).astype(np.uint8)  # cv2.dilate's result may replace it
        if self._dilation is not None:
            mask = cv2.dilate(mask, self._dilation)
        return mask[tile.inner], (valid[tile.inner] if f == 1 else None)
