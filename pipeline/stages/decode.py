"""Stage 1b, decode: each scene's 13 JPEG 2000 band files into tiled GeoTIFFs at their native resolution.

Why: JPEG 2000 decodes at ~8 Mpx/s per core; a tiled GeoTIFF with ZSTD level 1 reads some 45x faster
(docs/benchmarks.md, "Decode"). Annotate, dataset and infer all read the same bands, so decoding once, in
a CPU job that starts at once, spares every later stage (and the GPU job) that cost.

Layout: `{paths.decoded}/{product}.SAFE/{band}.tif` (one file per band, the product's CRS, transform, size
and no-data, uint16, 512 px tiles, ZSTD level 1) plus a completion record naming the JPEG 2000 files by
relative name, size and sampled content (pipeline/records/__init__.py). Nothing is resampled: the 20 m and 60 m
bands stay at 20 m and 60 m, so the later stages resample exactly as they did from JPEG 2000 and get the same
numbers.

Parallelism: the work units are strips one JPEG 2000 tile row high, across all bands (heaviest first), on a
pool of threads; each opens the file for its strip (GDAL releases the GIL), decodes it and writes it into the
band's GeoTIFF (one writer per file at a time). Memory: about two strips per thread and GDAL's block cache
(capped at 256 MiB), whatever the scene size.

Reading: `discover_readable(config, dates)` gives every band-reading stage scenes whose bands read from here
when a complete record vouches for them, and from JPEG 2000 otherwise (pipeline/data/layout.py,
Scene.read_path). See docs/architecture.md ("Decoded rasters").
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline import records
from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.config import PipelineConfig
from pipeline.data.band_reads import decoding
from pipeline.data.layout import Scene, discover_scenes, find_auxiliary
from pipeline.data.raster_checks import GDAL_ERRORS
from pipeline.data.reader import BLOCK_CACHE_BYTES, SceneReader
from pipeline.data.writer import atomic_raster
from pipeline.errors import SceneError
from pipeline.faults import reached
from pipeline.locks import output_lock
from pipeline.progress import say
from pipeline.records.annotation import masks_complete
from pipeline.records.per_output import produce
from pipeline.records.prediction import prediction_trusted
from pipeline.records.readers import other_readers, start_reading, stop_reading, wait_for_readers
from pipeline.registry import STAGES, inference_dates, stage_dates
from pipeline.stages.base import ProgressCallback, SceneOutcome, StageReport, raise_if_failed, run_scenes, usable_cpus

INFO = STAGES["decode"]
# The decoded format; changing how bands are written changes this, and every record with the old one is redone.
FORMAT = "gtiff-u16-zstd1-tile512-v2"
BLOCK = 512
STRIP_ROWS = 1024  # a strip when the band file is not internally tiled (striped GeoTIFFs, tests)


def band_file(band: str) -> str:
    return f"{band}.tif"


OUTPUTS = tuple(band_file(band) for band in BANDS)


def decoded_folder(config: PipelineConfig, scene: Scene) -> Path:
    """Keyed by product (the SAFE folder's name), so runs with other dates or tiles share it."""
    return config.path("decoded") / scene.safe_dir.name


def record_key(config: PipelineConfig, scene: Scene) -> records.RecordKey:
    """The JPEG 2000 files (relative name, size, sampled content) and the format: nothing in the config
    changes what this stage writes."""
    sources = [scene.band_path(band) for band in BANDS]
    return records.key_of_files(INFO.name, sources, [config.path("extracted_data")], FORMAT)


def with_decoded(config: PipelineConfig, scenes: list[Scene], redecode: bool = True) -> list[Scene]:
    """The scenes, each reading its bands from its decoded GeoTIFFs where a complete record of the same JPEG
    2000 files vouches for them; JPEG 2000 where there is nothing decoded to trust (never decoded, a band file
    changed since, a partial folder, a band missing or not a regular file), and always with `decode.enable:
    false` (as the README says).

    Decoded rasters damaged since they were written (another size or content than their record says) are never
    silently replaced by JPEG 2000: a CPU stage (`redecode`) decodes the scene again, first; a GPU stage gets the
    scene with `decoded_problem` set, and fails it naming the file and `snowpipe stage decode --force`."""
    if not config.decode.enable:
        return list(scenes)
    found = []
    for scene in scenes:
        folder = decoded_folder(config, scene)
        if scene.missing_bands or scene.odd_bands or not (folder / records.RECORD_NAME).is_file():
            _tell_if_released(folder, scene)
            found.append(scene)
            continue
        key = record_key(config, scene)
        complete = records.is_complete(folder, key, required=OUTPUTS)
        problem = "" if complete else _damage(folder, key)
        if problem and redecode:
            say(f"  {scene.id}: the decoded rasters are damaged ({problem}): decoding the scene again")
            decode_scene(scene, config, force=True)
            complete = records.is_complete(folder, key, required=OUTPUTS)
            problem = "" if complete else _damage(folder, key)
        if complete and _still_there_for(folder, scene):
            found.append(dataclasses.replace(scene, decoded={band: folder / band_file(band) for band in BANDS}))
        elif complete:
            found.append(scene)
        elif problem:
            found.append(dataclasses.replace(scene, decoded_problem=(
                f"the decoded rasters are damaged ({problem}): run `snowpipe stage decode CONFIG --scene "
                f"{scene.id} --force` on a CPU node, then this stage again")))
        else:
            found.append(scene)  # decoded from other JPEG 2000 files: the decode stage redoes it
    return found


def _still_there_for(folder: Path, scene: Scene) -> bool:
    """Register this process as a reader of the folder, then make sure it was not freed meanwhile (the order
    that makes freeing safe: pipeline/records/readers.py)."""
    start_reading(folder)
    if (folder / records.RECORD_NAME).is_file():
        return True
    stop_reading(folder)
    _tell_if_released(folder, scene)
    return False


def _released_mark(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.released")


def _tell_if_released(folder: Path, scene: Scene) -> None:
    if _released_mark(folder).is_file():
        say(f"  {scene.id}: its decoded rasters were freed once every stage had used them (decode.keep: "
            f"until_used): reading the JPEG 2000 files")


def _damage(folder: Path, key: records.RecordKey) -> str:
    """What is damaged in a decoded folder whose record is of these very JPEG 2000 files ("" when the record
    is of other files, or of an older format: then the folder is simply out of date)."""
    record = records.read_record(folder)
    if record is None or record.get("schema") != records.SCHEMA or record.get("inputs") != key.inputs or \
            record.get("config") != key.config:
        return ""
    problems = records.output_problems(folder, record.get("outputs", {}))
    return problems[0] if problems else ""


def discover_readable(config: PipelineConfig, dates: list[str], redecode: bool = True) -> list[Scene]:
    """discover_scenes for a stage that reads bands: decoded rasters where valid (one scene source)."""
    return with_decoded(config, discover_scenes(config.path("extracted_data"), config.tiles, dates), redecode)


# ---- decoding one scene ------------------------------------------------------------------------------------------

Strip = tuple[str, int, int]  # band, first row, rows


def _strips(band: str, height: int, block_rows: int) -> Iterator[Strip]:
    rows = block_rows if 1 < block_rows < height else STRIP_ROWS
    for row in range(0, height, rows):
        yield band, row, min(rows, height - row)


def _profile(source: rasterio.DatasetReader) -> dict:
    block = BLOCK if min(source.width, source.height) >= BLOCK else 256
    return {
        "driver": "GTiff", "dtype": "uint16", "count": 1, "width": source.width, "height": source.height,
        "crs": source.crs, "transform": source.transform, "nodata": source.nodata,
        "tiled": True, "blockxsize": block, "blockysize": block,
        # ZSTD level 1 without a predictor: read 1.7x faster than with horizontal differencing (409 against
        # 242 Mpx/s per core on a 10 m band; JPEG 2000: 8.7) for 23 % more bytes (docs/benchmarks.md, "Decode")
        "compress": "zstd", "zstd_level": 1,
        "sparse_ok": False,
    }


def decode_bands(scene: Scene, out_dir: Path, threads: int, on_strip: ProgressCallback | None = None) -> dict:
    """Write the scene's 13 bands as `{band}.tif` into `out_dir`; return the record's summary."""
    # GDAL's block cache bounds memory (it holds written tiles until they are flushed): 256 MiB, not 5 % of RAM.
    with rasterio.Env(GDAL_CACHEMAX=BLOCK_CACHE_BYTES), ExitStack() as outputs, GDAL_ERRORS.listening():
        strips: list[Strip] = []
        writers = {}
        pixels = 0
        for band in BANDS:
            path = scene.band_path(band)
            try:
                with rasterio.open(path) as source:
                    profile = _profile(source)
                    block_rows = int(source.block_shapes[0][0])
            except RasterioError as exc:
                raise SceneError(scene.id, f"cannot read {path}: {exc} (re-extract the product zip)") from None
            pixels += profile["width"] * profile["height"]
            strips.extend(_strips(band, profile["height"], block_rows))
            writers[band] = (outputs.enter_context(atomic_raster(out_dir / band_file(band), profile)),
                             profile["width"])
        # Heaviest strips first (10 m bands), so the pool ends together: longest-processing-time order.
        strips.sort(key=lambda strip: (BAND_RESOLUTION[strip[0]], strip[1]))
        stop = threading.Event()
        band_locks = {band: threading.Lock() for band in BANDS}  # one writer at a time per band file

        def decode_strip(strip: Strip) -> Strip:
            band, row, rows = strip
            if stop.is_set():
                raise InterruptedError
            path = scene.band_path(band)
            # The file opened per strip, by this thread (datasets must not be shared between threads; a header
            # costs milliseconds, a strip's decoding a second), decoded on this thread. Any GDAL warning or error
            # fails the scene naming the file (pipeline/data/band_reads.py, the policy of every reader): OpenJPEG
            # decodes a damaged code stream to garbage with only "Stream does not end with EOC".
            with decoding(scene, path, f"rows {row}-{row + rows - 1}"), rasterio.open(path) as source:
                dn = source.read(1, window=Window(0, row, source.width, rows))
            dataset, width = writers[band]
            with band_locks[band]:  # compressing in the decoding threads too: the main thread only waits
                dataset.write(dn, 1, window=Window(0, row, width, rows))
            return strip

        _in_pool(strips, decode_strip, stop, threads, f"decode-{scene.id}", on_strip)
    return {"bands": len(BANDS), "pixels": pixels, "format": FORMAT, "threads": threads}


def _in_pool(strips: list[Strip], decode_strip: Callable[[Strip], Strip], stop: threading.Event, threads: int,
             name: str, on_strip: ProgressCallback | None) -> None:
    """Decode the strips on a thread pool, at most two per thread queued (memory stays bounded); the first
    failure stops the rest (`stop`) and is raised."""
    done = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix=name) as pool:
        pending: set[Future] = set()
        queue = iter(strips)
        try:
            while True:
                while len(pending) < 2 * max(1, threads):
                    strip = next(queue, None)
                    if strip is None:
                        break
                    pending.add(pool.submit(decode_strip, strip))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    done += 1
                    reached("decode strip written")
                    if on_strip:
                        on_strip(done, len(strips))
        finally:
            stop.set()
            for future in pending:
                future.cancel()


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.tif"))


def decode_scene(scene: Scene, config: PipelineConfig, force: bool = False, threads: int | None = None,
                 on_strip: ProgressCallback | None = None) -> SceneOutcome:
    """Decode one scene into its folder under paths.decoded, built privately and published in one swap,
    under the folder's lock (two runs on one product: the second waits, then finds it complete)."""
    start = time.perf_counter()
    folder = decoded_folder(config, scene)
    with SceneReader(scene, scene.tile):  # missing bands, wrong CRS or grid: one line naming the file
        pass
    details = produce(folder, record_key(config, scene),
                      lambda partial: decode_bands(scene, partial, threads or usable_cpus(), on_strip),
                      what=f"decode {scene.id}", required=OUTPUTS, owned=("*.tif",), outputs=OUTPUTS, force=force,
                      before_publish=lambda: wait_for_readers(folder, f"decode {scene.id}",
                                                              ignore_pids=(os.getppid(),)))
    if details is None:
        return SceneOutcome(scene.id, "skipped")
    _released_mark(folder).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    details["summary"] = (f"13 bands decoded, {folder_bytes(folder) / 1e6:.0f} MB "
                          f"({details['pixels'] / seconds / 1e6:.1f} Mpx/s on {details['threads']} thread(s))")
    return SceneOutcome(scene.id, "done", seconds, details=details)


# ---- the space policy ----------------------------------------------------------------------------------------------

def _in_dataset(config: PipelineConfig, scene: Scene) -> bool:
    """Whether the dataset for the current dataset settings is complete and holds patches of the scene."""
    folder = config.path("dataset")
    try:
        manifest = json.loads((folder / records.DATASET_MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(manifest, dict) or manifest.get("schema") != records.SCHEMA or \
            manifest.get("config") != config.section_hash("dataset"):
        return False
    dates = {date for split in (manifest.get("splits") or {}).values() if isinstance(split, dict)
             for date in split.get("dates", [])}
    return scene.id in dates and not records.output_problems(folder, manifest.get("outputs", {}))


def finished_by_every_reader(config: PipelineConfig, scene: Scene) -> bool:
    """Whether annotate, dataset and infer, where enabled and covering the scene, have a complete output of it
    for the current config (a record of other settings or data does not count)."""
    covered_by_dates = not config.dates or scene.selected_by(config.dates)
    auxiliary = find_auxiliary(config.path("extracted_data"), scene.tile)
    if config.annotation.enable and covered_by_dates and not masks_complete(config, scene, auxiliary):
        return False
    if config.dataset.enable and covered_by_dates and not _in_dataset(config, scene):
        return False
    infer_dates = inference_dates(config)
    if config.inference.enable and (not infer_dates or scene.selected_by(infer_dates)) and \
            not prediction_trusted(config, scene, auxiliary):
        return False
    return True


def release_if_used(config: PipelineConfig, scene: Scene) -> None:
    """With decode.keep: until_used, delete a scene's decoded rasters once every enabled stage that reads them
    has a complete output of the scene for the current config, and no other process reads them. Called by those
    stages after each scene (this process's own reading ends here); cheap when keep: always.

    Deletes only what decode wrote: the band files its record lists, the record, then the folder if that left it
    empty. A folder without decode's record is not touched, so `paths.decoded` pointing at other data (the
    config check refuses that, docs/reliability.md) never costs a file that decode did not write."""
    if config.decode.keep != "until_used" or not scene.decoded:
        return
    folder = decoded_folder(config, scene)
    stop_reading(folder)
    if not finished_by_every_reader(config, scene):
        return
    with output_lock(folder, f"release decoded {scene.id}"):
        record = records.read_record(folder)
        if record is None or record.get("stage") != INFO.name:
            return
        records.clear(folder)  # first: a reader that registers from now on sees no record and reads JPEG 2000
        readers = other_readers(folder, ignore_pids=(os.getppid(),))
        if readers:  # registered before the record went: they read these files; the last one frees them
            records.write_record_data(folder, record)
            say(f"  {scene.id}: decoded rasters kept for now: {', '.join(readers)} still read them")
            return
        listed = record.get("outputs") or OUTPUTS
        ours = [folder / name for name in OUTPUTS if name in listed]
        ours = [path for path in ours if path.is_file() and not path.is_symlink()]
        freed = sum(path.stat().st_size for path in ours)
        for path in ours:
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # files decode did not write stay, and their folder with them
        _released_mark(folder).write_text(f"{scene.id}\n")
    say(f"  {scene.id}: freed {freed / 1e6:.0f} MB of decoded rasters (decode.keep: until_used)")


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    """Decode the selected scenes: `dates`, else every scene a band-reading stage of the config covers."""
    start = time.perf_counter()
    scenes = discover_scenes(config.path("extracted_data"), config.tiles, stage_dates(config, INFO.name, dates))
    threads = config.decode.workers or usable_cpus()
    report = StageReport(INFO.name, output=str(config.path("decoded")), note=f"{threads} thread(s)")
    if config.decode.keep == "until_used" and not force:  # a rerun decodes nothing it would free at once
        used = [scene for scene in scenes if not (decoded_folder(config, scene) / records.RECORD_NAME).is_file()
                and finished_by_every_reader(config, scene)]
        report.outcomes += [SceneOutcome(scene.id, "skipped", details={"summary": "every stage that reads it "
                                         "has finished (decode.keep: until_used)"}) for scene in used]
        scenes = [scene for scene in scenes if scene not in used]
    run_scenes(report, scenes, lambda scene, on_strip: decode_scene(scene, config, force, threads, on_strip))
    report.seconds = time.perf_counter() - start
    raise_if_failed(report)
    return report
