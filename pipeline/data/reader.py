"""Read any window of a scene on its 10 m grid: 13 bands as reflectance, validity, auxiliary layers.

Resampling choice (documented in the README): 20 m and 60 m bands are brought onto the 10 m grid
with *bilinear* interpolation that ignores no-data (DN 0), so values never blend with the swath
edge and 60 m bands show no 6-pixel blocks; categorical layers (lakes, surface water, glacier,
ExoLabs) use *nearest*; the DEM uses bilinear. Reading a coarser grid (cloud detection at 20 or 60 m)
uses *average*. Each band file is opened once per scene and read window by window through a
WarpedVRT, so memory depends on the window, never on the size of the scene.

Grid checks (metadata only, when a file is opened): every band must lie on the scene's grid (the 10 m grid
of B02) at its nominal resolution, and every auxiliary layer and ExoLabs raster must cover the scene.
A file that does not is a SceneError naming it, what it covers and what the scene needs: read through a
WarpedVRT it would silently give no data (coverage 0-39 %) where it falls short. A band must cover the whole
grid (it may overhang the far edges by less than one of its pixels, never fall short: 20 m bands of 219 px
beside 10 m bands of 439 px, a cropped product, crashed annotate).

Damage: every read of band pixels goes through pipeline/data/band_reads.py (any GDAL warning or error while
decoding is a damaged file, named with its fix). A band that is a folder, FIFO or device was found by
discovery (Scene.odd_bands) and is refused here before anything is opened.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.data.band_reads import SINGLE_THREADED, damage_fix, decoding
from pipeline.data.grid import Grid
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.normalise import reflectance
from pipeline.data.tiles import tile_crs
from pipeline.errors import DataError, SceneError

CATEGORICAL = {"lakes", "surface_water", "glacier", "exolabs"}
WARP_MEMORY_MB = 128
# GDAL's block cache keeps decoded JPEG 2000 tiles for the next window or strip that needs them. rasterio
# passes an integer GDAL_CACHEMAX to GDALSetCacheMax64, which counts bytes (256 alone meant 256 bytes).
BLOCK_CACHE_BYTES = 256 * 2**20
# A band's pixel size may differ this much (relative) from its nominal 10 / 20 / 60 m.
RESOLUTION_TOLERANCE = 1e-3
Bounds = tuple[float, float, float, float]  # left, bottom, right, top


def _extent(bounds: Bounds) -> str:
    left, bottom, right, top = bounds
    return f"x {left:.0f}..{right:.0f}, y {bottom:.0f}..{top:.0f}"


def _pixels(source: rasterio.DatasetReader) -> str:
    """'5490 x 5490 px of 20 m' (or of 0.0003 deg in a geographic CRS)."""
    xres, yres = source.res
    unit = " deg" if source.crs is not None and source.crs.is_geographic else " m"
    size = f"{xres:.6g}{unit}" if math.isclose(xres, yres, rel_tol=1e-6) else f"{xres:.6g} x {yres:.6g}{unit}"
    return f"{source.width} x {source.height} px of {size}"


def _overlap(a: Bounds, b: Bounds) -> float:
    """The share of `b`'s area that `a` covers."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return width * height / max((b[2] - b[0]) * (b[3] - b[1]), 1e-9)


class SceneReader:
    """Open once per scene (a context manager), then read windows of the 10 m grid or a coarser one."""

    def __init__(self, scene: Scene, tile: str, auxiliary: Auxiliary | None = None) -> None:
        self.scene = scene
        self.tile = tile
        self.auxiliary = auxiliary
        self._stack = ExitStack()
        self._sources: dict[str, rasterio.DatasetReader] = {}
        self._views: dict[tuple[str, int], rasterio.DatasetReader | WarpedVRT] = {}
        if scene.odd_bands:  # a folder, FIFO or device: never opened (a FIFO would block for ever)
            raise SceneError(scene.id, f"{'; '.join(scene.odd_bands.values())} (re-extract the product zip)")
        if scene.missing_bands:
            raise SceneError(
                scene.id,
                f"band(s) {', '.join(scene.missing_bands)} missing in {scene.safe_dir}/GRANULE/*/IMG_DATA "
                f"(re-extract the product zip)",
            )
        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=BLOCK_CACHE_BYTES, **SINGLE_THREADED))
            for band in BANDS:
                path = scene.read_path(band)
                self._sources[band] = self._open(path, f" ({damage_fix(scene, path)})")
        except BaseException:
            self._stack.close()
            raise
        ref = self._sources["B02"]
        self.grid = Grid(ref.crs, ref.transform, ref.width, ref.height)
        expected = tile_crs(tile)
        for source in self._sources.values():
            if source.crs != expected:
                self.close()
                raise SceneError(
                    scene.id,
                    f"{Path(source.name).name} is in {source.crs}, but tile {tile} is in {expected}: "
                    f"this file belongs to another tile or was reprojected; re-extract the product",
                )
        for band in sorted(BANDS, key=lambda band: band != "B02"):  # B02 first: it defines the grid
            problem = self._off_grid(band, self._sources[band])
            if problem:
                self.close()
                raise SceneError(scene.id, f"{problem}; re-extract the product zip")

    def _scene_extent(self) -> str:
        grid = self.grid
        return f"{_extent(grid.bounds)} ({grid.width} x {grid.height} px of {grid.resolution:g} m)"

    def _off_grid(self, band: str, source: rasterio.DatasetReader) -> str | None:
        """Why a band file does not lie on the scene's grid at its nominal resolution (None: it does).

        Sentinel-2 band grids share the tile's upper-left corner; a band whose pixels do not divide the
        scene's extent (demo and test scenes of any size) may overhang its far edges by less than a pixel.
        """
        nominal = BAND_RESOLUTION[band]
        xres, yres = source.res
        path = source.name
        rotated = source.transform.b != 0 or source.transform.d != 0
        if rotated or max(abs(xres - nominal), abs(yres - nominal)) > RESOLUTION_TOLERANCE * nominal:
            return (f"{path} has {_pixels(source)}, but {band} is a {nominal} m band (the scene's grid, from B02, "
                    f"is {self._scene_extent()}): the file was resampled or comes from another product")
        left, bottom, right, top = source.bounds
        g_left, g_bottom, g_right, g_top = self.grid.bounds
        half, below_one = nominal / 2, nominal * (1 - 1e-6)
        short = nominal * 1e-6  # the far edges may overhang by part of a pixel, never fall short
        if (abs(left - g_left) <= half and abs(top - g_top) <= half
                and -short <= right - g_right < below_one and -short <= g_bottom - bottom < below_one):
            return None
        needed = (math.ceil((g_right - g_left) / nominal - 1e-6), math.ceil((g_top - g_bottom) / nominal - 1e-6))
        return (f"{path} covers {_extent(source.bounds)} ({_pixels(source)}), but the scene's grid (B02) covers "
                f"{self._scene_extent()}, so {band} needs {needed[0]} x {needed[1]} px of {nominal} m there: "
                f"the file was cropped or comes from another tile or product")

    def _open(self, path: Path, fix: str = "") -> rasterio.DatasetReader:
        try:
            return self._stack.enter_context(rasterio.open(path))
        except RasterioError as exc:
            raise SceneError(self.scene.id, f"cannot read {path}: {' '.join(str(exc).split())}{fix}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _view(self, name: str, source: rasterio.DatasetReader, factor: int, resampling: Resampling,
              nodata: float | None) -> rasterio.DatasetReader | WarpedVRT:
        """The source as seen on the (possibly coarser) scene grid; a direct read where they coincide."""
        key = (name, factor)
        if key not in self._views:
            target = self.grid.scaled(factor)
            same = (source.crs == target.crs and source.transform.almost_equals(target.transform)
                    and source.width == target.width and source.height == target.height)
            if same:
                self._views[key] = source
            else:
                self._views[key] = self._stack.enter_context(WarpedVRT(
                    source, crs=target.crs, transform=target.transform, width=target.width,
                    height=target.height, resampling=resampling, src_nodata=nodata, nodata=nodata,
                    warp_mem_limit=WARP_MEMORY_MB,
                ))
        return self._views[key]

    def _read(self, view: rasterio.DatasetReader | WarpedVRT, window: Window, label: str) -> np.ndarray:
        try:
            return view.read(1, window=window)
        except RasterioError as exc:
            raise SceneError(self.scene.id, f"cannot read {label}: {exc}") from None

    def _read_pixels(self, band: str, view: rasterio.DatasetReader | WarpedVRT, window: Window) -> np.ndarray:
        """A band's window under the damage policy (pipeline/data/band_reads.py)."""
        with decoding(self.scene, self._sources[band].name):
            return view.read(1, window=window)

    def _shares_corner(self, source: rasterio.DatasetReader) -> bool:
        """Sentinel-2 band grids share the tile's upper-left corner and differ only in pixel size."""
        k = source.res[0] / self.grid.resolution
        return source.crs == self.grid.crs and source.transform.almost_equals(self.grid.transform @ Affine.scale(k))

    def _read_decimated(self, source: rasterio.DatasetReader, window: Window, scale: float) -> np.ndarray:
        """Average `scale` x `scale` source pixels per output pixel; a last output row or column that
        overhangs the file (grids coarser than the scene) repeats its neighbour."""
        height, width = int(window.height), int(window.width)
        rows = min(height, int((source.height - window.row_off * scale) // scale))
        cols = min(width, int((source.width - window.col_off * scale) // scale))
        native = Window(window.col_off * scale, window.row_off * scale, cols * scale, rows * scale)
        with decoding(self.scene, source.name):
            dn = source.read(1, window=native, out_shape=(rows, cols), resampling=Resampling.average)
        return np.pad(dn, ((0, height - rows), (0, width - cols)), mode="edge")

    def read_band(self, band: str, window: Window, factor: int = 1) -> np.ndarray:
        """Digital numbers of one band on the (possibly coarser) grid.

        Coarser than the band: averaged straight from the file, so GDAL decodes JPEG 2000 at a reduced
        resolution level (about 4x cheaper than decoding every pixel). Finer: a no-data-aware bilinear
        WarpedVRT. The same grid: a plain windowed read.
        """
        source = self._sources[band]
        target_res = self.grid.resolution * factor
        if source.res[0] < target_res - 1e-6 and self._shares_corner(source):
            return self._read_decimated(source, window, target_res / source.res[0])
        resampling = Resampling.bilinear if source.res[0] > target_res + 1e-6 else Resampling.average
        return self._read_pixels(band, self._view(band, source, factor, resampling, 0), window)

    def block_height(self, band: str = "B02") -> int:
        """Rows of one internal tile of a band file (1024 in L1C products): the unit JPEG 2000 decodes."""
        return int(self._sources[band].block_shapes[0][0])

    def read_dn(self, window: Window, factor: int = 1) -> np.ndarray:
        """Digital numbers (13, h, w) of every band on the (possibly coarser) grid."""
        return np.stack([self.read_band(band, window, factor) for band in BANDS])

    def read_bands(self, window: Window, factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-of-atmosphere reflectance (13, h, w) float32 and validity (h, w) bool for a window."""
        return reflectance([self.read_band(band, window, factor) for band in BANDS], self.scene.dn_offset)

    def read_valid(self, window: Window) -> np.ndarray:
        """Where all 13 bands have data (h, w) on the 10 m grid, without resampling any values.

        Each band is read at its native resolution and its validity repeated onto the 10 m pixels it
        covers (Sentinel-2 grids share their upper-left corner), which is exact and much cheaper than
        resampling the bands when only coverage is needed.
        """
        row0, col0 = int(window.row_off), int(window.col_off)
        height, width = int(window.height), int(window.width)
        valid = np.ones((height, width), bool)
        for band in BANDS:
            source = self._sources[band]
            k = round(source.res[0] / self.grid.resolution)
            if not self._shares_corner(source):  # an unusual product: fall back to the resampled read
                return self.read_bands(window)[1]
            r0, c0 = row0 // k, col0 // k
            native = Window(c0, r0, (col0 + width - 1) // k - c0 + 1, (row0 + height - 1) // k - r0 + 1)
            dn = self._read_pixels(band, source, native)
            band_valid = np.repeat(np.repeat(dn > 0, k, axis=0), k, axis=1)
            valid &= band_valid[row0 - r0 * k:row0 - r0 * k + height, col0 - c0 * k:col0 - c0 * k + width]
        return valid

    def read_layer(self, name: str, window: Window, factor: int = 1) -> np.ndarray:
        """An auxiliary layer ('lakes', 'surface_water', 'glacier', 'dem') or 'exolabs' on the grid."""
        if name == "exolabs":
            path = self.scene.exolabs
            if path is None:
                raise SceneError(
                    self.scene.id,
                    f"no ExoLabs file S2_{self.scene.tile}_{self.scene.day}*.tif in "
                    f"extracted_data/ExoLabs_classification_S2 (add it, or set annotation.exolabs_snow: false)",
                )
        else:
            path = self._auxiliary_path(name)
        source = self._open_layer(name, path)
        resampling = Resampling.nearest if name in CATEGORICAL else Resampling.bilinear
        return self._read(self._view(name, source, factor, resampling, source.nodata), window, str(path))

    def _auxiliary_path(self, name: str) -> Path:
        if self.auxiliary is None:
            raise DataError("no auxiliary data given to the reader")
        return self.auxiliary.path(name)

    def check_layers(self, *names: str) -> None:
        """Open and check layers now (instead of at their first read), so that a stage fails before writing."""
        for name in names:
            path = self.scene.exolabs if name == "exolabs" else self._auxiliary_path(name)
            if path is not None:
                self._open_layer(name, path)

    def _open_layer(self, name: str, path: Path) -> rasterio.DatasetReader:
        """Open an auxiliary layer or ExoLabs raster once, checking that it covers the scene."""
        if name not in self._sources:
            source = self._open(path)  # closed with the reader, also when the check below fails
            self._check_covers(name, path, source)
            self._sources[name] = source
        return self._sources[name]

    def _check_covers(self, name: str, path: Path, source: rasterio.DatasetReader) -> None:
        """The raster covers the scene's extent (in the scene's CRS), give or take one of its own pixels."""
        date = self.scene.id
        if source.crs is None:
            raise SceneError(date, f"{path} has no coordinate reference system (re-download it)")
        bounds: Bounds = tuple(source.bounds)
        where = ""
        if source.crs != self.grid.crs:
            try:
                bounds = transform_bounds(source.crs, self.grid.crs, *bounds, densify_pts=21)
            except (CRSError, RasterioError, ValueError) as exc:
                raise SceneError(date, f"cannot place {path} ({source.crs}) on the scene's grid in "
                                       f"{self.grid.crs}: {exc} (re-download it)") from None
            where = f" (from {source.crs})"
        left, bottom, right, top = bounds
        x_pixel, y_pixel = (right - left) / max(source.width, 1), (top - bottom) / max(source.height, 1)
        g_left, g_bottom, g_right, g_top = self.grid.bounds
        if (left <= g_left + x_pixel and bottom <= g_bottom + y_pixel
                and right >= g_right - x_pixel and top >= g_top - y_pixel):
            return
        if name == "exolabs":
            fix = f"re-download the ExoLabs classification of {self.scene.day} for tile {self.tile}"
        else:
            fix = f"re-download the auxiliary data of tile {self.tile}"
        share = _overlap(bounds, self.grid.bounds)
        raise SceneError(
            date,
            f"{path} covers {_extent(bounds)}{where} ({_pixels(source)}), only {share:.0%} of the scene's "
            f"{self._scene_extent()}: the file was cropped or comes from another tile; {fix}",
        )
