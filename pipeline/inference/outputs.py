"""Quicklooks of a predicted scene: true and false colour (GeoTIFF + PNG), and the mask over true colour.

They are for looking at, so they are written at reduced resolution (at most QUICKLOOK_SIDE px a side)
from decimated reads; no full-resolution array of the scene is ever held. The GeoTIFFs carry the
scene's CRS on a correspondingly coarser grid, so they overlay the 10 m outputs in a GIS.

The infer stage makes them beside the forward passes (`QuicklooksBeside`): the composites, which need only the
bands, on their own thread while the windows are predicted; the overlay, which needs the finished mask, after.
They cost about 2 s of one core per 1024 px scene (reading, GeoTIFF and PNG encoding, matplotlib), longer than
the forward passes over a whole tile on a GPU (docs/benchmarks.md, infer_efficiency, 2026-12-04).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import rasterio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.bands import BANDS, CLASS_NAMES, NODATA
from pipeline.data.grid import Grid
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.preview import CLASS_COLOURS, write_png
from pipeline.data.reader import SceneReader
from pipeline.data.writer import atomic_raster
from pipeline.plots import save_figure

QUICKLOOK_SIDE = 2048
TRUE_COLOUR = ("B04", "B03", "B02")
FALSE_COLOUR = ("B08", "B04", "B03")  # near infrared as red: vegetation red, snow white, water dark
OVERLAY_ALPHA = 0.5
LEGEND_ROW = 22  # px per legend row below the overlay


def quicklook_factor(grid: Grid, side: int = QUICKLOOK_SIDE) -> int:
    return max(1, math.ceil(max(grid.width, grid.height) / side))


def composite(reflectance: np.ndarray, valid: np.ndarray, bands: tuple[str, str, str], top: float = 1.0,
              gamma: float = 0.5) -> np.ndarray:
    """(3, h, w) uint8; 0 only outside the scene's data (data pixels are at least 1, as GIS no-data 0 needs)."""
    rgb = reflectance[[BANDS.index(b) for b in bands]]
    image = np.clip(np.clip(rgb / top, 0, 1) ** gamma * 255, 1, 255).astype(np.uint8)
    image[:, ~valid] = 0
    return image


def overlay(background: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Class colours blended over the true colour image; no-data stays black."""
    colours = np.zeros((3, *mask.shape), np.float32)
    for cls, colour in enumerate(CLASS_COLOURS):
        colours[:, mask == cls] = colour[:, None]
    blended = (1 - alpha) * background.astype(np.float32) + alpha * colours
    blended[:, mask == NODATA] = 0
    return blended.round().astype(np.uint8)


def write_overlay_png(target: Path, image: np.ndarray) -> None:
    """The overlay at its own pixel size, with a legend strip of the classes underneath."""
    height, width = image.shape[1:]
    columns = max(1, min(len(CLASS_NAMES), width // 110))
    strip = LEGEND_ROW * math.ceil(len(CLASS_NAMES) / columns)
    dpi = 100
    figure = Figure(figsize=(width / dpi, (height + strip) / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, strip / (height + strip), 1, height / (height + strip)))
    axes.imshow(np.moveaxis(image, 0, -1), interpolation="nearest")
    axes.set_axis_off()
    handles = [Patch(color=tuple(np.asarray(colour) / 255), label=name)
               for colour, name in zip(CLASS_COLOURS, CLASS_NAMES)]
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False,
                  handlelength=1.2, columnspacing=1.0, borderaxespad=0.2)
    save_figure(figure, target, dpi=dpi, bbox_inches=None)


def write_composites(out_dir: Path, reader: SceneReader) -> tuple[list[Path], np.ndarray, Grid]:
    """true_colour.tif/.png and false_colour.tif/.png from one decimated read of the scene; the files, the true
    colour image (the overlay's background) and its grid."""
    grid = reader.grid
    factor = quicklook_factor(grid)
    coarse = grid.scaled(factor)
    reflectance, valid = reader.read_bands(Window(0, 0, coarse.width, coarse.height), factor=factor)
    written = []
    images = {}
    for name, bands in (("true_colour", TRUE_COLOUR), ("false_colour", FALSE_COLOUR)):
        images[name] = composite(reflectance, valid, bands)
        with atomic_raster(out_dir / f"{name}.tif", coarse.geotiff_profile("uint8", 0, count=3)) as dst:
            dst.write(images[name])
        write_png(out_dir / f"{name}.png", images[name])
        written += [out_dir / f"{name}.tif", out_dir / f"{name}.png"]
    return written, images["true_colour"], coarse


def write_mask_overlay(out_dir: Path, background: np.ndarray, coarse: Grid, mask_path: Path) -> Path:
    """overlay.png: the mask, read on the composites' grid, over the true colour image."""
    with rasterio.open(mask_path) as src:
        mask = src.read(1, out_shape=(coarse.height, coarse.width), resampling=Resampling.nearest)
    write_overlay_png(out_dir / "overlay.png", overlay(background, mask))
    return out_dir / "overlay.png"


def write_quicklooks(out_dir: Path, reader: SceneReader, mask_path: Path) -> list[Path]:
    """true_colour.tif/.png, false_colour.tif/.png and overlay.png from one decimated read of the scene."""
    written, background, coarse = write_composites(out_dir, reader)
    return [*written, write_mask_overlay(out_dir, background, coarse, mask_path)]


class QuicklooksBeside:
    """The quicklooks of one scene, off the forward passes' path: entering starts the composites on a thread
    of their own (with a reader of their own), `finish(mask_path)` waits for them and adds the overlay once the
    mask is written. Leaving waits for the thread in any case, so nothing writes into the output folder after
    the block (a failed scene's partial folder is removed only then); a failure of the thread is raised by
    `finish`."""

    def __init__(self, out_dir: Path, scene: Scene, tile: str, auxiliary: Auxiliary | None) -> None:
        self.out_dir, self.scene, self.tile, self.auxiliary = out_dir, scene, tile, auxiliary
        self._result: tuple[list[Path], np.ndarray, Grid] | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._composites, name="quicklooks", daemon=True)

    def _composites(self) -> None:
        try:
            with SceneReader(self.scene, self.tile, self.auxiliary) as reader:
                self._result = write_composites(self.out_dir, reader)
        except BaseException as exc:  # handed to the caller by finish()
            self._failure = exc

    def __enter__(self) -> QuicklooksBeside:
        self._thread.start()
        return self

    def finish(self, mask_path: Path) -> list[Path]:
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        assert self._result is not None
        written, background, coarse = self._result
        return [*written, write_mask_overlay(self.out_dir, background, coarse, mask_path)]

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
