"""Stage 2, annotate: automatic masks from water rasters, glacier outlines, ExoLabs snow and s2cloudless.

Overlay order, later wins: water (COP lakes or JRC surface water) -> glacier -> ExoLabs snow (class 4)
-> s2cloudless clouds. Pixels without Sentinel-2 data, or where ExoLabs did not observe (when its snow
is used), are 255 in mask.tif and 0 in coverage.tif.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, as_completed
from pathlib import Path

import numpy as np

from pipeline.bands import CLOUDS, EXO_NO_DATA, EXO_SNOW, NODATA, SNOW, WATER
from pipeline.config import Annotation, PipelineConfig
from pipeline.data.grid import Tile, iter_tiles
from pipeline.data.layout import Auxiliary, Scene, find_auxiliary
from pipeline.data.preview import write_mask_preview
from pipeline.data.reader import SceneReader
from pipeline.data.writer import atomic_raster
from pipeline.errors import SceneError, SnowpipeError
from pipeline.progress import make_progress, say
from pipeline.records.annotation import mask_folder, record_key
from pipeline.records.per_output import produce
from pipeline.registry import STAGES, stage_dates
from pipeline.stages.base import (
    ProgressCallback,
    SceneOutcome,
    StageReport,
    describe,
    enforce_policy,
    failure_message,
    run_scenes,
    stage_stopped,
    stops_the_stage,
    worker_threads,
)
from pipeline.stages.clouds import CloudDetector
from pipeline.stages.decode import discover_readable, release_if_used
from pipeline.workers import pool_processes, run_task, stop_pool, worker_pool

INFO = STAGES["annotate"]


def annotate_window(reader: SceneReader, tile: Tile, settings: Annotation,
                    detector: CloudDetector | None) -> tuple[np.ndarray, np.ndarray]:
    """Mask (uint8 class ids, 255 = no data) and coverage (uint8 0/1) of one window's core."""
    core = tile.core
    cloud, valid = None, None
    if detector is not None:
        cloud, valid = detector.mask(reader, tile)
    if valid is None:
        valid = reader.read_valid(core)
    mask = np.zeros(valid.shape, np.uint8)
    if settings.water:
        water = (reader.read_layer("lakes", core) == 1) | (reader.read_layer("surface_water", core) == 1)
        mask[water] = WATER
    if settings.glacier:
        mask[reader.read_layer("glacier", core) == 1] = SNOW
    if settings.exolabs_snow:
        exolabs = reader.read_layer("exolabs", core)
        mask[exolabs == EXO_SNOW] = SNOW
        valid &= exolabs > EXO_NO_DATA
    if cloud is not None:
        mask[cloud == 1] = CLOUDS
    mask[~valid] = NODATA
    return mask, valid.astype(np.uint8)


MIN_COVERAGE = 0.001  # below this share of valid pixels a scene is an error, never a silent success
OUTPUTS = ("mask.tif", "coverage.tif", "preview.png")


def annotate_scene(scene: Scene, config: PipelineConfig, force: bool = False, threads: int = 0,
                   on_window: ProgressCallback | None = None) -> SceneOutcome:
    """Write {annotated_masks}/{date}/mask.tif, coverage.tif, preview.png and the completion record,
    built in a private folder and published in one swap, under the scene's lock."""
    start = time.perf_counter()
    auxiliary = find_auxiliary(config.path("extracted_data"), scene.tile)
    details = produce(mask_folder(config, scene), record_key(scene, config, auxiliary),
                      lambda partial: _write_masks(scene, config, auxiliary, partial, threads, on_window),
                      what=f"annotate {scene.id}", required=("mask.tif", "coverage.tif"), owned=OUTPUTS,
                      outputs=OUTPUTS, force=force)
    outcome = SceneOutcome(scene.id, "skipped") if details is None else \
        SceneOutcome(scene.id, "done", time.perf_counter() - start, details=details)
    release_if_used(config, scene)
    return outcome


def _write_masks(scene: Scene, config: PipelineConfig, auxiliary: Auxiliary, out_dir: Path, threads: int,
                 on_window: ProgressCallback | None) -> dict:
    """mask.tif, coverage.tif and preview.png of one scene into `out_dir`; the class shares for the record."""
    settings = config.annotation
    with SceneReader(scene, scene.tile, auxiliary) as reader:
        grid = reader.grid
        detector = None
        if settings.clouds:
            detector = CloudDetector(settings.cloud_detection, grid.resolution, threads, say=say)
        block, halo, align = (detector.block, detector.halo, detector.factor) if detector else (2048, 0, 1)
        tiles = list(iter_tiles(grid.height, grid.width, block, halo, align))
        counts = np.zeros(256, np.int64)
        with atomic_raster(out_dir / "mask.tif", grid.geotiff_profile("uint8", NODATA)) as mask_out, \
                atomic_raster(out_dir / "coverage.tif", grid.geotiff_profile("uint8", None)) as cov_out:
            for done, tile in enumerate(tiles, 1):
                mask, coverage = annotate_window(reader, tile, settings, detector)
                mask_out.write(mask, 1, window=tile.core)
                cov_out.write(coverage, 1, window=tile.core)
                counts += np.bincount(mask.ravel(), minlength=256)
                if on_window:
                    on_window(done, len(tiles))
            coverage_share = float(counts[:4].sum() / max(counts.sum(), 1))
            if coverage_share < MIN_COVERAGE:
                raise SceneError(scene.id, _low_coverage(scene, coverage_share, settings))
        write_mask_preview(out_dir / "preview.png", reader, out_dir / "mask.tif")
    valid = counts[:4].sum()
    return {
        "coverage": round(float(valid / counts.sum()), 4),
        "class_fraction": [round(float(c / max(valid, 1)), 4) for c in counts[:4]],
        **({"cloud_detector": detector.model.name} if detector else {}),
    }


def _low_coverage(scene: Scene, share: float, settings: Annotation) -> str:
    """Why a scene has (almost) no valid pixel, and what to check."""
    exolabs = (f" or where ExoLabs ({scene.exolabs.name if scene.exolabs else 'missing'}) observed nothing"
               if settings.exolabs_snow else "")
    return (f"only {share:.2%} of the scene has data (the bands have no data{exolabs}); no mask written: "
            f"check the scene's files, or leave the date out of the config")


def _annotate_in_worker(scene: Scene, config: PipelineConfig, force: bool, threads: int) -> SceneOutcome:
    try:
        return annotate_scene(scene, config, force, threads)
    except SnowpipeError as exc:
        if stops_the_stage(exc):  # a full disk: the parent stops every worker
            raise
        return SceneOutcome(scene.id, "failed", message=failure_message(exc))


def _annotate_in_pool(report: StageReport, scenes: list[Scene], config: PipelineConfig, force: bool, workers: int,
                      threads: int) -> None:
    """Annotate scenes in `workers` spawned processes. Ctrl-C, SIGTERM, SIGHUP or a full disk stops them all at
    once (pipeline/workers.py: the scenes not started are not started, the running ones unwind and remove their
    partial folders) before the interrupt or the error goes on."""
    before = set(multiprocessing.active_children())
    with make_progress() as progress, worker_pool(workers) as pool:
        try:
            scene_bar = progress.add_task("annotate: scenes", total=len(scenes))
            futures: dict[Future, Scene] = {pool.submit(run_task, _annotate_in_worker, s, config, force, threads): s
                                            for s in scenes}
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except SnowpipeError as exc:
                    if not stops_the_stage(exc):
                        raise
                    left = len(scenes) - len(report.outcomes) - 1
                    raise stage_stopped(report, futures[future].id, exc, left) from exc
                report.outcomes.append(outcome)
                say(describe(outcome))
                progress.advance(scene_bar)
        except BaseException:
            stop_pool(pool, pool_processes(before))
            raise


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False,
        workers: int | None = None) -> StageReport:
    """Annotate the selected scenes (all of the config's by default), several in parallel."""
    start = time.perf_counter()
    settings = config.annotation
    scenes = discover_readable(config, stage_dates(config, INFO.name, dates))
    workers = min(workers or settings.workers, len(scenes))
    threads = worker_threads(workers)
    report = StageReport(INFO.name, output=str(config.path("annotated_masks")))
    if workers <= 1:
        run_scenes(report, scenes, lambda scene, on_window: annotate_scene(scene, config, force, threads, on_window))
    else:
        _annotate_in_pool(report, scenes, config, force, workers, threads)
    report.outcomes.sort(key=lambda o: o.scene)
    report.seconds = time.perf_counter() - start
    enforce_policy(report, settings.on_scene_error, "annotation")
    return report
