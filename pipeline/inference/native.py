"""The infer stage's input from decoded rasters: bands read at native resolution on the host, resampled and
normalised on the device.

Why: on a GPU node the CPUs are few and the device idles while they warp 20 m and 60 m bands to the 10 m
grid and normalise them. Here a reading thread only reads each band's native uint16 block (a plain windowed
read of a tiled GeoTIFF, plus one pixel of margin for the interpolation); the device does the rest
(`DeviceInput`): no-data-aware bilinear upsampling, the per-band lookup-table normalisation, the validity
mask. The same code runs on the CPU (tests, the embedded cluster).

Upsampling as GDAL's WarpedVRT does it (pipeline/data/reader.py): a 10 m pixel centre i maps to the source
coordinate (i + 0.5) / k - 0.5 (k = 2 or 6), which is torch's `interpolate(..., align_corners=False)`;
no-data (DN 0) is left out by interpolating `[x * m, m]` and dividing; a pixel is no data where its nearest
source pixel is; values are rounded half up. The result equals the CPU reader for the 20 m bands and lies
within 1 DN of it for the 60 m bands on about 1 % of pixels (tests/test_native_input.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.data.band_reads import decoding
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.inference.source import OpenInput, ReadWindow

# Bands by their factor to the 10 m grid: 10 m bands are read as they are, 20 m and 60 m upsampled.
GROUPS: dict[int, list[int]] = {}
for _index, _band in enumerate(BANDS):
    GROUPS.setdefault(BAND_RESOLUTION[_band] // 10, []).append(_index)


@dataclass
class BandBlock:
    """The native pixels of some bands that a window of the 10 m grid needs (with a pixel of margin)."""

    factor: int
    bands: list[int]  # indices into BANDS
    dn: torch.Tensor  # (n, rows, cols) uint16 on the host (pinned when a CUDA device will take it)
    row_skip: int  # 10 m rows of the upsampled block above the window
    col_skip: int


@dataclass
class NativeWindow:
    height: int
    width: int
    blocks: list[BandBlock]
    dem: torch.Tensor | None  # (h, w) float32 normalised DEM on the host, or None


def source_span(start: int, length: int, factor: int, size: int) -> tuple[int, int]:
    """First and last native pixel that bilinear interpolation reads for 10 m pixels [start, start + length)."""
    if factor == 1:
        return start, start + length - 1
    first = max(0, math.floor((start + 0.5) / factor - 0.5))
    last = min(size - 1, math.floor((start + length - 0.5) / factor - 0.5) + 1)
    return first, last


def native_input(scene: Scene, tile: str, auxiliary: Auxiliary | None, normaliser: Normaliser,
                 pin: bool = False) -> Callable[[], AbstractContextManager[Callable[[Window], NativeWindow]]]:
    """An opener of `NativeWindow`s for a scene whose bands are decoded rasters (Scene.decoded)."""

    @contextmanager
    def open_input() -> Iterator[Callable[[Window], NativeWindow]]:
        with SceneReader(scene, tile, auxiliary) as reader, ExitStack() as stack:
            sources = [stack.enter_context(rasterio.open(scene.read_path(band))) for band in BANDS]

            def read(window: Window) -> NativeWindow:
                row0, col0 = int(window.row_off), int(window.col_off)
                height, width = int(window.height), int(window.width)
                blocks = []
                for factor, indices in GROUPS.items():
                    first = sources[indices[0]]
                    r0, r1 = source_span(row0, height, factor, first.height)
                    c0, c1 = source_span(col0, width, factor, first.width)
                    dn = np.empty((len(indices), r1 - r0 + 1, c1 - c0 + 1), np.uint16)
                    for i, index in enumerate(indices):
                        # a damaged file is a SceneError naming it and its fix (pipeline/data/band_reads.py)
                        with decoding(scene, sources[index].name):
                            sources[index].read(1, window=Window(c0, r0, c1 - c0 + 1, r1 - r0 + 1), out=dn[i])
                    host = torch.from_numpy(dn)
                    blocks.append(BandBlock(factor, indices, host.pin_memory() if pin else host,
                                            row0 - r0 * factor, col0 - c0 * factor))
                dem = None
                if normaliser.dem_mean is not None:
                    assert normaliser.dem_scale is not None
                    raw = reader.read_layer("dem", window).astype(np.float32)
                    dem = torch.from_numpy((raw - normaliser.dem_mean) / normaliser.dem_scale)
                return NativeWindow(height, width, blocks, dem)

            yield read

    return open_input


class DeviceInput:
    """Turns a NativeWindow into the model's input on the device: (channels, h, w) float32 and validity."""

    def __init__(self, normaliser: Normaliser, dn_offset: int, device: torch.device) -> None:
        self.device = device
        self.tables = torch.from_numpy(normaliser.dn_tables(dn_offset)).to(device)  # (13, 65536)
        self.channels = len(normaliser.channels)

    def __call__(self, native: NativeWindow) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = native.height, native.width
        dn = torch.empty((len(BANDS), h, w), dtype=torch.float32, device=self.device)
        for block in native.blocks:
            # uint16 crosses as int16 (torch's CUDA kernels cover int16 fully, uint16 only partly)
            values = block.dn.view(torch.int16).to(self.device, non_blocking=True).int().bitwise_and_(0xFFFF).float()
            if block.factor == 1:
                dn[block.bands] = values[:, block.row_skip:block.row_skip + h, block.col_skip:block.col_skip + w]
                continue
            dn[block.bands] = upsample(values, block.factor)[:, block.row_skip:block.row_skip + h,
                                                             block.col_skip:block.col_skip + w]
        valid = (dn > 0).all(dim=0)
        index = (dn * valid).long().view(len(BANDS), -1)  # DN 0 in every band where one has no data
        out = torch.empty((self.channels, h, w), dtype=torch.float32, device=self.device)
        out[:len(BANDS)] = self.tables.gather(1, index).view(len(BANDS), h, w)
        if native.dem is not None:
            out[len(BANDS)] = native.dem.to(self.device, non_blocking=True)
        return out, valid


def device_input(scene: Scene, tile: str, auxiliary: Auxiliary | None, normaliser: Normaliser,
                 device: torch.device) -> OpenInput:
    """An opener of the model's input on the device: each reading thread reads a window's native blocks and
    hands them to the device itself, so on a CPU the resampling overlaps the forward pass instead of
    following it, and on a GPU the copies and kernels are queued while the previous batch computes."""
    native = native_input(scene, tile, auxiliary, normaliser, pin=device.type == "cuda")
    to_device = DeviceInput(normaliser, scene.dn_offset, device)

    @contextmanager
    def open_input() -> Iterator[ReadWindow]:
        with native() as read:
            yield lambda window: to_device(read(window))

    return open_input


def upsample(values: torch.Tensor, factor: int) -> torch.Tensor:
    """(n, rows, cols) DN -> (n, rows * factor, cols * factor): no-data-aware bilinear, rounded half up."""
    x = values[None]
    valid = (x > 0).float()
    size = (x.shape[-2] * factor, x.shape[-1] * factor)
    weighted = F.interpolate(x * valid, size=size, mode="bilinear", align_corners=False)
    weight = F.interpolate(valid, size=size, mode="bilinear", align_corners=False)
    nearest = F.interpolate(valid, size=size, mode="nearest")
    result = torch.floor(weighted / weight.clamp_min(1e-12) + 0.5)
    return torch.where((nearest > 0) & (weight > 0), result, torch.zeros_like(result))[0]
