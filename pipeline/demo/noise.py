"""Cheap random fields and resampling: coarse lattices upsampled, so a full 10980 px tile stays fast."""

from __future__ import annotations

import math

import cv2
import numpy as np


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """One octave: white noise on a lattice of ~`cells` cells along the longer side, bicubic-upsampled."""
    h, w = shape
    longest = max(h, w)
    ny = max(2, math.ceil(cells * h / longest) + 1)
    nx = max(2, math.ceil(cells * w / longest) + 1)
    lattice = rng.standard_normal((ny, nx), dtype=np.float32)
    return cv2.resize(lattice, (w, h), interpolation=cv2.INTER_CUBIC)


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: float, octaves: int, gain: float = 0.5
) -> np.ndarray:
    """Sum of octaves (each twice as fine, `gain` times as strong), scaled to zero mean and unit std."""
    finest = max(shape) / 3.0  # an octave finer than ~3 px per cell adds only aliasing
    out = np.zeros(shape, np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        octave_cells = cells * 2**octave
        if octave and octave_cells > finest:
            break
        octave_field = smooth_noise(rng, shape, octave_cells)
        octave_field *= np.float32(amplitude)
        out += octave_field
        amplitude *= gain
    return standardize(out)


def standardize(field: np.ndarray) -> np.ndarray:
    """Zero mean, unit std in place (statistics from a subsample: exact enough, and cheap on big fields)."""
    sample = field[::7, ::7]
    field -= np.float32(sample.mean())
    field /= np.float32(max(float(sample.std()), 1e-6))
    return field


def quantile(field: np.ndarray, q: float) -> float:
    """Quantile estimated on a subsample."""
    return float(np.quantile(field[::5, ::5], q))


def upsample(field: np.ndarray, factor: int, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Coarse grid to a finer one sharing its corner (e.g. 30 m -> 10 m): every coarse pixel covers exactly
    factor x factor fine ones, bilinear for continuous fields, repeated for masks; cropped to `shape`."""
    if nearest:
        fine = np.repeat(np.repeat(field, factor, axis=0), factor, axis=1)
    else:
        fine = cv2.resize(field, (field.shape[1] * factor, field.shape[0] * factor), interpolation=cv2.INTER_LINEAR)
    return fine[: shape[0], : shape[1]]


def block_mean(field: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Average factor x factor blocks (what a coarser detector sees), edge-padded to cover `shape`."""
    if factor == 1:
        return field
    h, w = shape
    pad_y, pad_x = h * factor - field.shape[0], w * factor - field.shape[1]
    if pad_y or pad_x:
        field = np.pad(field, ((0, pad_y), (0, pad_x)), mode="edge")
    return field.reshape(h, factor, w, factor).mean(axis=(1, 3), dtype=np.float32)
