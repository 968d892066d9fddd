"""Where to cut patches: block summaries of a mask, read in strips, and random covered positions.

A scene is summarised on a lattice of small blocks (per block: fully covered? pixels per class),
reading the mask one strip of blocks at a time, so memory does not grow with the scene. A patch is
drawn as a square of blocks that is fully covered, plus a random offset inside it: the patch
always lies inside coverage and its position is not tied to the lattice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline.bands import CLASS_NAMES

N_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class BlockSummary:
    block: int
    full: np.ndarray  # (rows, cols) bool: every pixel covered and labelled with a class
    counts: np.ndarray  # (rows, cols, classes) pixels per class


@dataclass(frozen=True)
class Candidates:
    """Squares of blocks fully inside coverage, with their class pixel counts."""

    rows: np.ndarray  # top-left pixel row of the square
    cols: np.ndarray
    counts: np.ndarray  # (n, classes)
    span: int  # side of the square in pixels


def summarise(mask: rasterio.DatasetReader, coverage: rasterio.DatasetReader, block: int) -> BlockSummary:
    n_rows, n_cols = mask.height // block, mask.width // block
    full = np.zeros((n_rows, n_cols), bool)
    counts = np.zeros((n_rows, n_cols, N_CLASSES), np.int64)
    for i in range(n_rows):
        window = Window(0, i * block, n_cols * block, block)
        labels = mask.read(1, window=window).reshape(block, n_cols, block)
        covered = coverage.read(1, window=window).reshape(block, n_cols, block) == 1
        full[i] = (covered & (labels < N_CLASSES)).all(axis=(0, 2))
        for c in range(N_CLASSES):
            counts[i, :, c] = (labels == c).sum(axis=(0, 2))
    return BlockSummary(block, full, counts)


def _square_sums(values: np.ndarray, side: int) -> np.ndarray:
    """Sum over every side x side square of the leading two axes (integral image)."""
    integral = np.zeros((values.shape[0] + 1, values.shape[1] + 1, *values.shape[2:]), np.int64)
    integral[1:, 1:] = values.cumsum(0).cumsum(1)
    return (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
            + integral[:-side, :-side])


def candidates(summary: BlockSummary, patch: int) -> Candidates:
    side = math.ceil(patch / summary.block) + 1
    empty = Candidates(np.zeros(0, int), np.zeros(0, int), np.zeros((0, N_CLASSES), np.int64),
                       side * summary.block)
    if summary.full.shape[0] < side or summary.full.shape[1] < side:
        return empty
    covered = _square_sums(summary.full.astype(np.int64), side) == side * side
    rows, cols = np.nonzero(covered)
    counts = _square_sums(summary.counts, side)[rows, cols]
    return Candidates(rows * summary.block, cols * summary.block, counts, side * summary.block)


def class_weights(pixels: np.ndarray) -> np.ndarray:
    """Inverse class frequency, so rare classes (water) are drawn about as often as common ones."""
    frequency = pixels / max(pixels.sum(), 1)
    return 1.0 / np.maximum(frequency, 1e-4)


def choose(rng: np.random.Generator, found: Candidates, n: int, patch: int,
           weights: np.ndarray | None = None) -> list[tuple[int, int]]:
    """n patch positions (row, col); with `weights`, squares rich in heavy classes are preferred."""
    if len(found.rows) == 0:
        return []
    p = None
    if weights is not None:
        score = (found.counts * weights).sum(1) / np.maximum(found.counts.sum(1), 1)
        p = score / score.sum()
    picked = rng.choice(len(found.rows), size=n, replace=n > len(found.rows), p=p)
    jitter = rng.integers(0, found.span - patch + 1, size=(n, 2))
    return sorted((int(found.rows[i] + dr), int(found.cols[i] + dc)) for i, (dr, dc) in zip(picked, jitter))
