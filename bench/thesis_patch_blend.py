"""The thesis' whole-scene prediction, kept for comparison only (tests and benchmarks), not shipped.

256 px patches at stride 128, probabilities blended with a tent weight and normalised by the weight sum:
4x the computation per pixel of snowpipe's large windows (pipeline/inference/tiling.py), and the whole
scene's probabilities held in memory.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window

from pipeline.inference.predictor import Predictor
from pipeline.inference.readahead import read_ahead
from pipeline.inference.source import OpenInput


def tent(length: int) -> np.ndarray:
    """The thesis' (1 - |x|) weight, sampled at pixel centres so that border pixels keep a small weight."""
    x = (np.arange(length) + 0.5) / length * 2 - 1
    return (1 - np.abs(x)).astype(np.float32)


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Patch offsets at `stride`; the last one ends on the scene edge (the thesis left an eastern strip)."""
    if length <= patch:
        return [0]
    return [*range(0, length - patch, stride), length - patch]


def predict_patch_blend(open_input: OpenInput, height: int, width: int, predictor: Predictor, patch: int = 256,
                        stride: int = 128, batch_size: int = 16,
                        readers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The thesis scheme: (classes, H, W) blended probabilities and (H, W) validity of the whole scene.

    For comparison only (tests, benchmark): it holds the scene's probabilities in memory, as the thesis did.
    """
    windows = [Window(c, r, min(patch, width - c), min(patch, height - r))
               for r in patch_starts(height, patch, stride) for c in patch_starts(width, patch, stride)]
    total = np.zeros((predictor.classes, height, width), np.float32)
    weights = np.zeros((height, width), np.float32)
    valid = np.zeros((height, width), bool)
    batch: list[tuple[Window, np.ndarray]] = []

    def flush() -> None:
        probs = predictor.probabilities(np.stack([x for _, x in batch])).cpu().numpy()
        for (win, _), p in zip(batch, probs):
            rows, cols = win.toslices()
            kernel = np.outer(tent(p.shape[1]), tent(p.shape[2]))
            total[:, rows, cols] += p * kernel
            weights[rows, cols] += kernel
        batch.clear()

    for index, x, ok in read_ahead(open_input, windows, readers, depth=2 * batch_size):
        win = windows[index]
        rows, cols = win.toslices()
        valid[rows, cols] = ok
        if batch and batch[0][1].shape != x.shape:
            flush()
        batch.append((win, x))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return total / weights, valid
