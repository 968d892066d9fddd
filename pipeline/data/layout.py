"""Find scenes, band files, ExoLabs rasters and auxiliary layers in the extracted_data layout.

Discovery only looks at names and file types; nothing is opened here. A scene with a missing band is still
listed (with `missing_bands`), so that one broken scene fails alone when it is processed. So is a scene whose
band is a folder, FIFO or device (`odd_bands`): such a file is never in `bands`, so no stage opens it (a FIFO
blocked its reader for ever, a folder was an internal error).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.bands import AUX_FILES, BANDS, BASELINE_04_OFFSET
from pipeline.errors import DataError, SceneError

SAFE_NAME = re.compile(
    r"^(?P<mission>S2[ABCD])_MSIL1C_(?P<date>\d{8}T\d{6})_N(?P<baseline>\d{4})_R(?P<orbit>\d{3})"
    r"_T(?P<tile>\d{2}[A-Z]{3})_(?P<stamp>\w+)\.SAFE$"
)
BAND_SUFFIXES = (".jp2", ".tif", ".tiff")
EXOLABS_FOLDER = "ExoLabs_classification_S2"


@dataclass(frozen=True)
class Scene:
    """One Sentinel-2 L1C acquisition of the tile, identified by its date key YYYYMMDDTHHMMSS."""

    date: str
    mission: str
    baseline: str  # processing baseline as in the product name, e.g. "0400"
    safe_dir: Path
    bands: dict[str, Path] = field(default_factory=dict)
    missing_bands: tuple[str, ...] = ()
    exolabs: Path | None = None
    # Band files the decode stage wrote at native resolution (pipeline/stages/decode.py), when a complete
    # record vouches for them: read instead of the JPEG 2000 files, which stay the scene's identity.
    decoded: dict[str, Path] = field(default_factory=dict)
    # Band files that are not regular files (a folder, FIFO, device), band -> why: refused before any opening.
    odd_bands: dict[str, str] = field(default_factory=dict)
    # Why the decoded rasters cannot be trusted (damaged since decode wrote them), for a stage that may not
    # decode them again itself (infer: a GPU job does only GPU work): it fails the scene with this.
    decoded_problem: str = ""

    @property
    def day(self) -> str:
        """Calendar day YYYY-MM-DD: ExoLabs files are named by it."""
        return f"{self.date[0:4]}-{self.date[4:6]}-{self.date[6:8]}"

    @property
    def dn_offset(self) -> int:
        """Products of processing baseline 04.00 and later add 1000 to every digital number."""
        return BASELINE_04_OFFSET if int(self.baseline) >= 400 else 0

    def band_path(self, band: str) -> Path:
        if band in self.odd_bands:
            raise SceneError(self.date, f"{self.odd_bands[band]} (re-extract the product zip)")
        if band not in self.bands:
            raise SceneError(
                self.date,
                f"band {band} missing: expected a file *_{band}.jp2 in {self.safe_dir}/GRANULE/*/IMG_DATA "
                f"(re-extract the product zip)",
            )
        return self.bands[band]

    def read_path(self, band: str) -> Path:
        """The file to read a band from: its decoded GeoTIFF when there is one, else the product's file."""
        return self.decoded.get(band) or self.band_path(band)


@dataclass(frozen=True)
class Auxiliary:
    """The static layers of the tile (lakes, surface water, glacier, DEM); None when absent."""

    folder: Path | None
    layers: dict[str, Path | None]

    def path(self, name: str) -> Path:
        found = self.layers.get(name)
        if found is None:
            where = self.folder or "extracted_data/{TILE}_auxiliary_data"
            raise DataError(f"auxiliary layer {name} missing: expected *_{AUX_FILES[name]} in {where}")
        return found


def _image_folder(safe_dir: Path) -> Path | None:
    granules = sorted(p for p in (safe_dir / "GRANULE").glob("*/IMG_DATA") if p.is_dir())
    return granules[0] if granules else None


def odd_file(path: Path) -> str | None:
    """Why `path` cannot be a band file (a folder, FIFO, device or socket), from os.stat alone: nothing is
    opened, a symlink is followed to what it names. None for a regular file, and where stat fails (a dangling
    link, no permission): that is said where the file is read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{path} is {kind}, not a band file"


def _band_files(img_dir: Path | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Band files by name suffix, so old (S2A_OPER_...) and new (T32TNS_...) granule names both work; and the
    bands named only by something that is not a regular file (band -> why)."""
    if img_dir is None:
        return {}, {}
    found: dict[str, Path] = {}
    odd: dict[str, str] = {}
    for path in sorted(img_dir.iterdir()):
        stem, suffix = path.stem, path.suffix.lower()
        if suffix in BAND_SUFFIXES and len(stem) > 4 and stem[-4] == "_" and stem[-3:] in BANDS:
            band = stem[-3:]
            problem = odd_file(path)
            if problem:
                odd.setdefault(band, problem)
            else:
                found.setdefault(band, path)
    return found, {band: why for band, why in odd.items() if band not in found}


def find_exolabs(extracted: Path, tile: str, day: str) -> Path | None:
    """The ExoLabs raster of a calendar day (S2_{TILE}_{YYYY-MM-DD}*.tif); first by name if several."""
    folder = extracted / EXOLABS_FOLDER
    if not folder.is_dir():
        return None
    hits = sorted(folder.glob(f"S2_{tile}_{day}*.tif"))
    return hits[0] if hits else None


def exolabs_by_day(extracted: Path, tile: str) -> dict[str, Path]:
    """find_exolabs for every calendar day from one listing of the ExoLabs folder: day -> its raster.

    The same rule as find_exolabs' glob, S2_{TILE}_{YYYY-MM-DD}*.tif matched on names, the first by name where a
    day has several; one listing instead of one glob of the whole folder per scene (that grew with scenes^2).
    """
    folder = extracted / EXOLABS_FOLDER
    prefix = f"S2_{tile}_"
    start, end = len(prefix), len(prefix) + len("YYYY-MM-DD")
    first: dict[str, str] = {}
    try:
        names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    except OSError:  # unreadable: as the glob, which finds nothing there
        names = []
    for name in names:
        if name.startswith(prefix) and name.endswith(".tif") and len(name) >= end + len(".tif"):
            day = name[start:end]
            if day not in first or name < first[day]:
                first[day] = name
    return {day: folder / name for day, name in first.items()}


def find_auxiliary(extracted: Path, tile: str) -> Auxiliary:
    """Accept both {TILE}_auxiliary_data (what the code used) and {TILE}-auxiliary_data (the docs)."""
    folder = next(
        (extracted / name for name in (f"{tile}_auxiliary_data", f"{tile}-auxiliary_data")
         if (extracted / name).is_dir()),
        None,
    )
    layers: dict[str, Path | None] = {}
    for name, suffix in AUX_FILES.items():
        candidate = folder / f"{tile}_{suffix}" if folder else None
        layers[name] = candidate if candidate is not None and candidate.is_file() else None
    return Auxiliary(folder, layers)


def discover_scenes(extracted: Path, tile: str, dates: list[str] | None = None) -> list[Scene]:
    """All L1C scenes of `tile` in `extracted`, sorted by date; `dates` (if given) must all exist."""
    if not extracted.is_dir():
        raise DataError(
            f"extracted_data folder {extracted} does not exist: fix paths.extracted_data in the config "
            f"or create demo data with `snowpipe demo-data OUT`"
        )
    scenes: dict[str, Scene] = {}
    exolabs = exolabs_by_day(extracted, tile)
    for safe_dir in sorted(extracted.iterdir()):
        match = SAFE_NAME.match(safe_dir.name)
        if not match or not safe_dir.is_dir() or match["tile"] != tile:
            continue
        bands, odd = _band_files(_image_folder(safe_dir))
        date = match["date"]
        scenes[date] = Scene(
            date=date,
            mission=match["mission"],
            baseline=match["baseline"],
            safe_dir=safe_dir,
            bands=bands,
            missing_bands=tuple(b for b in BANDS if b not in bands and b not in odd),
            odd_bands=odd,
            exolabs=exolabs.get(f"{date[0:4]}-{date[4:6]}-{date[6:8]}"),
        )
    if not scenes:
        zips = sorted(extracted.glob(f"S2*_MSIL1C_*_T{tile}_*.zip"))
        hint = f" ({len(zips)} product zip(s) found: unzip them there)" if zips else ""
        raise DataError(
            f"no Sentinel-2 L1C scenes of tile {tile} (S2?_MSIL1C_*_T{tile}_*.SAFE folders) "
            f"in {extracted}{hint}"
        )
    return select_dates([scenes[d] for d in sorted(scenes)], extracted, dates)


def select_dates(found: list[Scene], extracted: Path, dates: list[str] | None) -> list[Scene]:
    """The scenes of `dates` (all of `found` when none), as discover_scenes returns them: what one discovery
    serves to several date lists (a plan's stages, validate's checks) without listing the folders again."""
    if not dates:
        return list(found)
    scenes = {scene.date: scene for scene in found}
    unknown = [d for d in dates if d not in scenes]
    if unknown:
        raise DataError(
            f"date(s) {', '.join(unknown)} in the config match no scene in {extracted}; "
            f"available: {', '.join(sorted(scenes))}"
        )
    return [scenes[d] for d in sorted(dates)]
