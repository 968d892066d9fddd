"""Find scenes, band files, ExoLabs rasters and auxiliary layers in the extracted_data layout.

A scene is known by its id `{TILE}_{YYYYMMDDTHHMMSS}`: neighbouring tiles of one pass share the sensing time, so
the date alone is not unique. The extracted_data folder and the ExoLabs folder are each listed once, for every
tile of the config (docs/architecture.md, "Tiles and scene ids").

Discovery only looks at names and file types; nothing is opened here. A scene with a missing band is still
listed (with `missing_bands`), so that one broken scene fails alone when it is processed. So is a scene whose
band is a folder, FIFO or device (`odd_bands`): such a file is never in `bands`, so no stage opens it (a FIFO
blocked its reader for ever, a folder was an internal error).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
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


SCENE_ID = re.compile(r"^(?P<tile>\d{2}[A-Z]{3})_(?P<date>\d{8}T\d{6})$")


def scene_id(tile: str, date: str) -> str:
    return f"{tile}_{date}"


@dataclass(frozen=True)
class Scene:
    """One Sentinel-2 L1C acquisition: a tile at a sensing time YYYYMMDDTHHMMSS, known by `id`."""

    date: str
    tile: str
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
    # Products of the same tile and sensing time that this one (the newest processing baseline) won over.
    superseded: tuple[Path, ...] = ()

    @property
    def id(self) -> str:
        """`{TILE}_{YYYYMMDDTHHMMSS}`: output folders, records, task lists, logs and status rows use it."""
        return scene_id(self.tile, self.date)

    def selected_by(self, selectors: Sequence[str] | set[str]) -> bool:
        """Whether a list of dates / scene ids (the config's `dates` lists) names this scene."""
        return self.id in selectors or self.date in selectors

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
            raise SceneError(self.id, f"{self.odd_bands[band]} (re-extract the product zip)")
        if band not in self.bands:
            raise SceneError(
                self.id,
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
    """The ExoLabs raster of a tile and calendar day (S2_{TILE}_{YYYY-MM-DD}*.tif); first by name if several."""
    return exolabs_by_day(extracted, [tile]).get((tile, day))


def exolabs_by_day(extracted: Path, tiles: Sequence[str]) -> dict[tuple[str, str], Path]:
    """Every tile's ExoLabs rasters from one listing of the ExoLabs folder: (tile, day) -> its raster.

    Names S2_{TILE}_{YYYY-MM-DD}*.tif; the first by name where a tile and day have several. One listing for every
    scene and tile, instead of one glob of the whole folder per scene (that grew with scenes^2).
    """
    folder = extracted / EXOLABS_FOLDER
    wanted = set(tiles)
    first: dict[tuple[str, str], str] = {}
    try:
        names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    except OSError:  # unreadable: nothing found there, as a glob would
        names = []
    start, end = len("S2_TTTTT_"), len("S2_TTTTT_YYYY-MM-DD")
    for name in names:
        if not (name.startswith("S2_") and name.endswith(".tif") and len(name) >= end + len(".tif")
                and name[8] == "_"):
            continue
        key = (name[3:8], name[start:end])
        if key[0] in wanted and (key not in first or name < first[key]):
            first[key] = name
    return {key: folder / name for key, name in first.items()}


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


Auxiliaries = dict[str, Auxiliary]  # tile -> its static layers


def find_auxiliaries(extracted: Path, tiles: Sequence[str]) -> Auxiliaries:
    """Every tile's static layers, for stages that read scenes of several tiles."""
    return {tile: find_auxiliary(extracted, tile) for tile in tiles}


def tile_list(tiles: str | Sequence[str]) -> list[str]:
    return [tiles] if isinstance(tiles, str) else list(tiles)


def discover_scenes(extracted: Path, tiles: str | Sequence[str], dates: Sequence[str] | None = None) -> list[Scene]:
    """All L1C scenes of `tiles` in `extracted`, sorted by scene id; `dates` (dates or scene ids, if given) must
    each name a scene. Of two products of one tile and sensing time, the newest processing baseline wins
    (`Scene.superseded` names the others; `superseded_notes` says it)."""
    tiles = tile_list(tiles)
    if not extracted.is_dir():
        raise DataError(
            f"extracted_data folder {extracted} does not exist: fix paths.extracted_data in the config "
            f"or create demo data with `snowpipe demo-data OUT`"
        )
    wanted = set(tiles)
    exolabs = exolabs_by_day(extracted, tiles)
    products: dict[str, list[tuple[str, Path, re.Match[str]]]] = {}
    for entry in sorted(os.scandir(extracted), key=lambda e: e.name):
        match = SAFE_NAME.match(entry.name)
        if match and match["tile"] in wanted and entry.is_dir():
            products.setdefault(scene_id(match["tile"], match["date"]), []).append(
                (match["baseline"], Path(entry.path), match))
    scenes: list[Scene] = []
    for key in sorted(products):
        candidates = sorted(products[key], key=lambda c: (c[0], c[1].name), reverse=True)
        _, safe_dir, match = candidates[0]
        bands, odd = _band_files(_image_folder(safe_dir))
        date, tile = match["date"], match["tile"]
        scenes.append(Scene(
            date=date,
            tile=tile,
            mission=match["mission"],
            baseline=match["baseline"],
            safe_dir=safe_dir,
            bands=bands,
            missing_bands=tuple(b for b in BANDS if b not in bands and b not in odd),
            odd_bands=odd,
            exolabs=exolabs.get((tile, f"{date[0:4]}-{date[4:6]}-{date[6:8]}")),
            superseded=tuple(c[1] for c in candidates[1:]),
        ))
    found_tiles = {scene.tile for scene in scenes}
    empty = [tile for tile in tiles if tile not in found_tiles]
    if empty:
        raise DataError(_no_scenes(extracted, empty))
    return select_dates(scenes, extracted, dates)


def _no_scenes(extracted: Path, tiles: list[str]) -> str:
    names = ", ".join(tiles)
    zips = [z for tile in tiles for z in extracted.glob(f"S2*_MSIL1C_*_T{tile}_*.zip")]
    hint = f" ({len(zips)} product zip(s) found: unzip them there)" if zips else ""
    pattern = f"S2?_MSIL1C_*_T{tiles[0]}_*.SAFE folders" if len(tiles) == 1 else "S2?_MSIL1C_*_T{TILE}_*.SAFE folders"
    return (f"no Sentinel-2 L1C scenes of tile {names} ({pattern}) in {extracted}{hint}; "
            f"add the products or drop the tile from `tiles`")


def superseded_notes(scenes: Sequence[Scene]) -> list[str]:
    """One line per scene chosen over a product of another processing baseline: the choice is said."""
    return [f"{scene.id}: {scene.safe_dir.name} (baseline {scene.baseline}) chosen over "
            f"{', '.join(p.name for p in scene.superseded)}: the newest processing baseline wins"
            for scene in scenes if scene.superseded]


def select_dates(found: Sequence[Scene], extracted: Path, dates: Sequence[str] | None) -> list[Scene]:
    """The scenes `dates` names (all of `found` when none), sorted by id. An entry is a scene id
    (32TNS_20211220T102309: that scene) or a sensing time (20211220T102309: that time in every tile). What one
    discovery serves to several date lists (a plan's stages, validate's checks) without listing folders again."""
    if not dates:
        return list(found)
    by_id = {scene.id: scene for scene in found}
    by_date: dict[str, list[Scene]] = {}
    for scene in found:
        by_date.setdefault(scene.date, []).append(scene)
    chosen: dict[str, Scene] = {}
    unknown = []
    for entry in dates:
        hits = [by_id[entry]] if entry in by_id else by_date.get(entry, [])
        if not hits:
            unknown.append(entry)
        chosen.update((scene.id, scene) for scene in hits)
    if unknown:
        raise DataError(
            f"date(s) {', '.join(unknown)} in the config match no scene in {extracted}; "
            f"available: {available(found)}"
        )
    return [chosen[key] for key in sorted(chosen)]


def available(scenes: Sequence[Scene]) -> str:
    """A short list of scene ids for a message: the first six and how many more."""
    ids = sorted(scene.id for scene in scenes)
    return ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
