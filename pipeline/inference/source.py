"""The model's input for any window of a scene: normalised bands (and DEM), plus where the scene has data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
from rasterio.windows import Window

from pipeline.data.decoded import DecodedScene
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader

# read(window) -> (inputs (C, h, w) float32, valid (h, w) bool): numpy arrays, or tensors already on the
# model's device (pipeline/inference/native.py)
ReadWindow = Callable[[Window], tuple[Any, Any]]
# Each reading thread opens its own: rasterio datasets must not be shared between threads.
OpenInput = Callable[[], AbstractContextManager[ReadWindow]]


def scene_input(scene: Scene, tile: str, auxiliary: Auxiliary | None, normaliser: Normaliser,
                decoded: DecodedScene | None = None) -> OpenInput:
    """An opener of the scene's normalised input, exactly as the training patches were normalised.

    With `decoded`, the bands come from the scene decoded once (pipeline/data/decoded.py) instead of
    being decoded again for every window; the numbers are the same. The digital numbers are normalised
    through per-band lookup tables (Normaliser.dn_tables), which equal the computed normalisation.
    """

    tables = normaliser.dn_tables(scene.dn_offset)  # shared by the reading threads

    @contextmanager
    def open_input() -> Iterator[ReadWindow]:
        with SceneReader(scene, tile, auxiliary) as reader:

            def read(window: Window) -> tuple[np.ndarray, np.ndarray]:
                dn = decoded.read_dn(window) if decoded else reader.read_dn(window)
                dem = reader.read_layer("dem", window) if normaliser.dem_mean is not None else None
                return normaliser.apply_dn(dn, tables, dem)

            yield read

    return open_input


def array_input(inputs: np.ndarray, valid: np.ndarray | None = None) -> OpenInput:
    """An in-memory scene (tests, benchmarks): inputs (C, H, W) already normalised."""
    valid = np.ones(inputs.shape[1:], bool) if valid is None else valid

    @contextmanager
    def open_input() -> Iterator[ReadWindow]:
        def read(window: Window) -> tuple[np.ndarray, np.ndarray]:
            rows, cols = window.toslices()
            return np.ascontiguousarray(inputs[:, rows, cols]), valid[rows, cols]

        yield read

    return open_input
