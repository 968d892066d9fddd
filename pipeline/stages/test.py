"""Stage 6, test: compare predicted masks with a reference (ExoLabs or the annotated masks).

Pixels outside coverage (prediction 255, or a reference that did not observe them) are left out of every
metric; the thesis zeroed them and so counted them as background agreement. Everything is read window by
window and summed into one confusion matrix per scene, so memory does not grow with the scene, and the
overall scores come from the sum of the scenes' matrices (pixel-weighted), never from averaged ratios.
The module bears the stage's name; pytest collects only test_*.py and *_test.py, so it is not taken for tests.
"""

from __future__ import annotations

import csv
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from pipeline import plots, records
from pipeline.bands import (
    BACKGROUND,
    CLASS_NAMES,
    CLOUDS,
    EXO_CLOUDS,
    EXO_GLACIER_ICE,
    EXO_NO_DATA,
    EXO_NOT_OBSERVED,
    EXO_SNOW,
    EXO_WATER,
    NODATA,
    SNOW,
    WATER,
)
from pipeline.config import PipelineConfig
from pipeline.data.grid import Grid, iter_tiles
from pipeline.data.layout import Scene, discover_scenes, find_auxiliary
from pipeline.data.masks import find_mask
from pipeline.data.reader import SceneReader
from pipeline.data.writer import atomic_path, remove_temporaries, write_json
from pipeline.errors import SceneError, SnowpipeError
from pipeline.locks import output_lock
from pipeline.metrics import class_scores, confusion_matrix, json_number, mean_iou
from pipeline.progress import console, make_progress, say
from pipeline.records import prediction as identity
from pipeline.registry import STAGES, stage_dates
from pipeline.stages.base import (
    ProgressCallback,
    SceneOutcome,
    StageFailed,
    StageReport,
    failure_message,
)

INFO = STAGES["test"]

WINDOW = 1024
PREVIEW_SIDE = 1024
N_CLASSES = len(CLASS_NAMES)
METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"
LOG_WIDTH = 120


def exolabs_lookup() -> np.ndarray:
    """ExoLabs code -> class id: 4 snow and 8 glacier ice -> snow, 3 -> clouds, 6 -> water,
    0 not observed / 1 no data -> ignored, 2 dark / 5 vegetation / 7 bare soil -> background.

    Codes the 9-class product does not define (e.g. a 255 fill) are ignored rather than called background.
    """
    lookup = np.full(256, NODATA, np.uint8)
    lookup[[2, 5, 7]] = BACKGROUND
    lookup[[EXO_SNOW, EXO_GLACIER_ICE]] = SNOW
    lookup[EXO_CLOUDS] = CLOUDS
    lookup[EXO_WATER] = WATER
    lookup[[EXO_NOT_OBSERVED, EXO_NO_DATA]] = NODATA
    return lookup


EXOLABS_TO_CLASS = exolabs_lookup()


def exolabs_reference(codes: np.ndarray) -> np.ndarray:
    return EXOLABS_TO_CLASS[codes.astype(np.uint8, copy=False)]


def mask_reference(mask: np.ndarray, coverage: np.ndarray | None) -> np.ndarray:
    """An annotated mask with the pixels its coverage excludes (coverage 0) set to ignored."""
    if coverage is None:
        return mask
    return np.where(coverage == 0, np.uint8(NODATA), mask)


# ---------------------------------------------------------------- scores of one confusion matrix


def summarise(matrix: np.ndarray, total_pixels: int) -> dict:
    """Per-class scores and pixel counts, multi-class IoU, accuracy and the matrix (rows: reference)."""
    matrix = np.asarray(matrix, np.int64)
    scores = class_scores(matrix)
    reference, predicted = matrix.sum(1), matrix.sum(0)
    classes = {
        name: {**{k: json_number(v) for k, v in scores[name].items()},
               "pixels": int(reference[i]), "predicted_pixels": int(predicted[i])}
        for i, name in enumerate(CLASS_NAMES[: matrix.shape[0]])
    }
    compared = int(matrix.sum())
    return {
        "classes": classes,
        "miou": json_number(mean_iou(matrix)),
        "pixel_accuracy": json_number(float(np.trace(matrix) / compared) if compared else math.nan),
        "confusion_matrix": matrix.tolist(),
        "pixels": {"total": total_pixels, "compared": compared, "ignored": total_pixels - compared},
    }


# ---------------------------------------------------------------- reading one scene


@dataclass(frozen=True)
class SceneInputs:
    scene: Scene
    prediction: Path
    reference: Path | None  # ExoLabs raster or annotated mask.tif; None when missing
    coverage: Path | None  # annotated masks only


def prediction_path(config: PipelineConfig, scene: str) -> Path:
    return config.path("results") / "predictions" / scene / "mask.tif"


def find_inputs(config: PipelineConfig, scene: Scene) -> SceneInputs:
    if config.testing.reference == "exolabs":
        return SceneInputs(scene, prediction_path(config, scene.id), scene.exolabs, None)
    masks = find_mask(config.path("annotated_masks"), scene, config.tiles)
    return SceneInputs(scene, prediction_path(config, scene.id), masks.mask, masks.coverage)


def _check_inputs(inputs: SceneInputs, config: PipelineConfig) -> None:
    reference, masks_root = config.testing.reference, config.path("annotated_masks")
    date = inputs.scene.id
    if not inputs.prediction.is_file():
        raise SceneError(date, f"prediction {inputs.prediction} not found: run the infer stage "
                               f"(snowpipe stage infer --scene {date})")
    auxiliary = find_auxiliary(config.path("extracted_data"), inputs.scene.tile)
    if not identity.prediction_trusted(config, inputs.scene, auxiliary):
        raise SceneError(date, f"prediction {inputs.prediction} is not the infer stage's complete output for "
                               f"this scene, checkpoint and config (interrupted, failed or outdated): run "
                               f"`snowpipe stage infer --scene {date}` first")
    if inputs.reference is None:
        if reference == "exolabs":
            raise SceneError(inputs.scene.id, f"no ExoLabs file S2_{inputs.scene.tile}_{inputs.scene.day}*.tif in "
                                                f"extracted_data/ExoLabs_classification_S2 (add it, or set "
                                                f"testing.reference: annotated_masks)")
        raise SceneError(inputs.scene.id, f"annotated mask {masks_root / inputs.scene.id / 'mask.tif'} not "
                                            f"found: run the annotate stage, or set testing.reference: exolabs")


def _grid(source: rasterio.DatasetReader) -> Grid:
    return Grid(source.crs, source.transform, source.width, source.height)


def _describe(source: rasterio.DatasetReader | Grid) -> str:
    return f"{source.width}x{source.height} px in {source.crs}"


def _same_grid(source: rasterio.DatasetReader, grid: Grid) -> bool:
    return (source.width, source.height) == (grid.width, grid.height) and source.crs == grid.crs \
        and source.transform.almost_equals(grid.transform)


class ReferenceSource:
    """The reference of one scene, read window by window (or decimated) on the prediction's grid."""

    def __init__(self, inputs: SceneInputs, config: PipelineConfig, prediction: rasterio.DatasetReader,
                 stack: ExitStack) -> None:
        self.kind = config.testing.reference
        self.inputs = inputs
        date = inputs.scene.id
        if self.kind == "exolabs":
            self.reader = stack.enter_context(SceneReader(inputs.scene, inputs.scene.tile))
            if not _same_grid(prediction, self.reader.grid):
                raise SceneError(date, f"prediction {inputs.prediction} ({_describe(prediction)}) is not on the "
                                       f"scene's 10 m grid ({_describe(self.reader.grid)}): rerun the infer "
                                       f"stage for this scene with --force")
            return
        assert inputs.reference is not None
        self.mask = stack.enter_context(_open(date, inputs.reference))
        self.coverage = stack.enter_context(_open(date, inputs.coverage)) if inputs.coverage else None
        for source in (self.mask, self.coverage):
            if source is not None and not _same_grid(source, _grid(prediction)):
                raise SceneError(date, f"{source.name} ({_describe(source)}) is not on the grid of prediction "
                                       f"{inputs.prediction} ({_describe(prediction)}): rerun the annotate or "
                                       f"infer stage for this scene")

    def read(self, window: Window) -> np.ndarray:
        if self.kind == "exolabs":
            return exolabs_reference(self.reader.read_layer("exolabs", window))
        coverage = self.coverage.read(1, window=window) if self.coverage is not None else None
        return mask_reference(self.mask.read(1, window=window), coverage)

    def read_reduced(self, factor: int, shape: tuple[int, int]) -> np.ndarray:
        """The whole reference at `factor` times coarser resolution (nearest), for the difference map."""
        if self.kind == "exolabs":
            return exolabs_reference(self.reader.read_layer("exolabs", Window(0, 0, shape[1], shape[0]), factor))
        coverage = _read_reduced(self.coverage, shape) if self.coverage is not None else None
        return mask_reference(_read_reduced(self.mask, shape), coverage)


def _open(date: str, path: Path) -> rasterio.DatasetReader:
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise SceneError(date, f"cannot read {path}: {exc}") from None


def _read_reduced(source: rasterio.DatasetReader, shape: tuple[int, int]) -> np.ndarray:
    return source.read(1, out_shape=shape, resampling=Resampling.nearest)


@dataclass
class SceneResult:
    scene: str  # the scene id
    tile: str
    matrix: np.ndarray
    total_pixels: int
    predicted_reduced: np.ndarray
    reference_reduced: np.ndarray


def compare_scene(inputs: SceneInputs, config: PipelineConfig,
                  on_window: ProgressCallback | None = None) -> SceneResult:
    """Accumulate the confusion matrix over windows; keep a reduced copy of both masks for the picture."""
    date = inputs.scene.id
    _check_inputs(inputs, config)
    with ExitStack() as stack:
        prediction = stack.enter_context(_open(date, inputs.prediction))
        grid = _grid(prediction)
        reference = ReferenceSource(inputs, config, prediction, stack)
        matrix = np.zeros((N_CLASSES, N_CLASSES), np.int64)
        tiles = list(iter_tiles(grid.height, grid.width, WINDOW))
        try:
            for done, tile in enumerate(tiles, 1):
                predicted = prediction.read(1, window=tile.core)
                matrix += confusion_matrix(predicted, reference.read(tile.core), N_CLASSES, NODATA)
                if on_window:
                    on_window(done, len(tiles))
            factor = max(1, math.ceil(max(grid.width, grid.height) / PREVIEW_SIDE))
            shape = (math.ceil(grid.height / factor), math.ceil(grid.width / factor))
            predicted_reduced = _read_reduced(prediction, shape)
            reference_reduced = reference.read_reduced(factor, shape)
        except RasterioError as exc:
            raise SceneError(date, f"cannot read {inputs.prediction} or its reference: {exc}") from None
    return SceneResult(date, inputs.scene.tile, matrix, grid.width * grid.height, predicted_reduced,
                       reference_reduced)


# ---------------------------------------------------------------- outputs


def write_csv(target: Path, metrics: dict) -> None:
    """One row per scene and class, a row "all" per scene (iou = multi-class IoU), then the overall rows."""
    fields = ["scope", "class", "iou", "dice", "precision", "recall", "pixels", "predicted_pixels", "pixel_accuracy"]
    tiles = [(f"tile {tile}", block) for tile, block in metrics.get("tiles", {}).items()]
    blocks = [*metrics["scenes"].items(), *tiles, ("overall", metrics["overall"])]
    with atomic_path(target) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for scope, block in blocks:
            for name, scores in block["classes"].items():
                writer.writerow([scope, name, *(_cell(scores[k]) for k in fields[2:8]), ""])
            writer.writerow([scope, "all", _cell(block["miou"]), "", "", "", block["pixels"]["compared"], "",
                             _cell(block["pixel_accuracy"])])


def _cell(value: float | int | None) -> str:
    return "" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_tables(metrics: dict) -> None:
    """Per-class scores overall, then one line per scene: readable in a terminal and in a SLURM log."""
    # A log file (SLURM) has room: a wider console than the default 80 columns never cuts a date short.
    out = console if console.is_terminal else Console(file=console.file, width=LOG_WIDTH, highlight=False)
    overall = metrics["overall"]
    table = Table(title=f"test: overall against {metrics['reference']} (multi-class IoU "
                        f"{_fmt(overall['miou'])}, pixel accuracy {_fmt(overall['pixel_accuracy'])})")
    for column in ("class", "IoU", "Dice", "precision", "recall", "reference px", "predicted px"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for name, s in overall["classes"].items():
        table.add_row(name, _fmt(s["iou"]), _fmt(s["dice"]), _fmt(s["precision"]), _fmt(s["recall"]),
                      f"{s['pixels']:,}", f"{s['predicted_pixels']:,}")
    out.print(table)
    scenes = Table(title="test: per scene, then per tile (IoU per class, share of pixels compared)")
    scenes.add_column("scene", no_wrap=True, min_width=21)
    for column in ("mIoU", "acc.", *CLASS_NAMES, "compared"):
        scenes.add_column(column, justify="right", no_wrap=True)
    tiles = metrics.get("tiles", {})
    rows = [*metrics["scenes"].items(), *((f"tile {t}", block) for t, block in tiles.items() if len(tiles) > 1)]
    for name, block in rows:
        share = block["pixels"]["compared"] / max(1, block["pixels"]["total"])
        scenes.add_row(name, _fmt(block["miou"]), _fmt(block["pixel_accuracy"]),
                       *(_fmt(block["classes"][n]["iou"]) for n in CLASS_NAMES), f"{share:.0%}")
    out.print(scenes)


def write_outputs(out: Path, reference: str, results: list[SceneResult], failed: dict[str, str]) -> dict:
    """metrics.json, metrics.csv and the PNGs for the scenes that could be compared."""
    scenes = {r.scene: summarise(r.matrix, r.total_pixels) for r in results}
    overall_matrix = sum((r.matrix for r in results), np.zeros((N_CLASSES, N_CLASSES), np.int64))
    overall = summarise(overall_matrix, sum(r.total_pixels for r in results))
    tiles = per_tile(results)
    scene_mious = [s["miou"] for s in scenes.values() if s["miou"] is not None]
    overall["mean_scene_miou"] = json_number(float(np.mean(scene_mious))) if scene_mious else None
    metrics = {
        "reference": reference,
        "classes": list(CLASS_NAMES),
        "confusion_matrix_layout": "rows: reference class, columns: predicted class (order of 'classes')",
        "scenes": scenes,
        "tiles": tiles,
        "overall": overall,
        "failed": failed,
    }
    write_json(out / METRICS_JSON, metrics)
    write_csv(out / METRICS_CSV, metrics)
    plots.plot_confusion_matrix(overall_matrix, out / "confusion_matrix.png",
                                title=f"All scenes against {reference} (rows normalised)")
    per_scene = {date: {**{n: s["classes"][n]["iou"] for n in CLASS_NAMES}, "mIoU": s["miou"]}
                 for date, s in scenes.items()}
    plots.plot_iou_per_scene(per_scene, out / "iou_per_scene.png", title=f"IoU per scene against {reference}")
    per_tile_iou = {tile: {**{n: s["classes"][n]["iou"] for n in CLASS_NAMES}, "mIoU": s["miou"]}
                    for tile, s in tiles.items()}
    plots.plot_iou_per_scene(per_tile_iou, out / "iou_per_tile.png", title=f"IoU per tile against {reference}")
    for r in results:
        plots.plot_difference_map(r.predicted_reduced, r.reference_reduced, out / f"difference_{r.scene}.png",
                                  title=f"{r.scene}: prediction vs {reference}")
    return metrics


def per_tile(results: list[SceneResult]) -> dict[str, dict]:
    """The scores of each tile from its scenes' summed confusion matrices (as overall, one tile at a time)."""
    tiles: dict[str, dict] = {}
    for tile in sorted({r.tile for r in results}):
        mine = [r for r in results if r.tile == tile]
        tiles[tile] = summarise(sum((r.matrix for r in mine), np.zeros((N_CLASSES, N_CLASSES), np.int64)),
                                sum(r.total_pixels for r in mine))
        tiles[tile]["scenes"] = len(mine)
    return tiles


# ---------------------------------------------------------------- the stage


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    """Compare every selected scene's prediction with its reference; write metrics and plots."""
    start = time.perf_counter()
    out = config.path("results") / "testing"
    report = StageReport(INFO.name, output=str(out))
    scenes = discover_scenes(config.path("extracted_data"), config.tiles, stage_dates(config, INFO.name, dates))
    all_inputs = [find_inputs(config, scene) for scene in scenes]
    key = records.key_for(INFO.name, config, [p if p is not None and p.is_file() else None
                                              for i in all_inputs for p in (i.prediction, i.reference, i.coverage)],
                          "testing")
    with output_lock(out, "test"):
        return _compare_all(config, out, scenes, all_inputs, key, force, report, start)


def _compare_all(config: PipelineConfig, out: Path, scenes: list[Scene], all_inputs: list[SceneInputs],
                 key: records.RecordKey, force: bool, report: StageReport, start: float) -> StageReport:
    """Under the testing folder's lock: skip complete metrics, or compare every scene and write them."""
    reference = config.testing.reference
    if not force and records.is_complete(out, key, required=(METRICS_JSON,)):
        report.outcomes = [SceneOutcome(s.id, "skipped") for s in scenes]
        report.note = "already complete (use --force to redo)"
        _print_existing(out / METRICS_JSON)
        report.seconds = time.perf_counter() - start
        return report
    records.clear(out)
    remove_temporaries(out)

    results: list[SceneResult] = []
    with make_progress() as progress:
        scene_bar = progress.add_task("test: scenes", total=len(scenes))
        for inputs in all_inputs:
            window_bar = progress.add_task(f"  {inputs.scene.id}", total=None)

            def on_window(done: int, total: int, bar: TaskID = window_bar) -> None:
                progress.update(bar, completed=done, total=total)

            scene_start = time.perf_counter()
            try:
                result = compare_scene(inputs, config, on_window)
                results.append(result)
                miou = mean_iou(result.matrix)
                outcome = SceneOutcome(inputs.scene.id, "done", time.perf_counter() - scene_start,
                                       details={"miou": None if math.isnan(miou) else miou})
                say(f"  {outcome.scene}: multi-class IoU {_fmt(outcome.details['miou'])} "
                    f"({outcome.seconds:.1f} s)")
            except SnowpipeError as exc:
                outcome = SceneOutcome(inputs.scene.id, "failed", message=failure_message(exc))
                say(f"  {outcome.scene}: FAILED: {outcome.message}")
            progress.remove_task(window_bar)
            report.outcomes.append(outcome)
            progress.advance(scene_bar)

    failed = {o.scene: o.message for o in report.failed}
    if results:
        metrics = write_outputs(out, reference, results, failed)
        print_tables(metrics)
    report.seconds = time.perf_counter() - start
    if failed:
        lines = "\n  ".join(f"{date}: {message}" for date, message in failed.items())
        written = f"metrics of the other {len(results)} scene(s) are in {out}" if results else "nothing written"
        raise StageFailed(f"test failed for {len(failed)} scene(s):\n  {lines}\n({written})")
    records.write_record(out, key, [METRICS_JSON, METRICS_CSV], scenes=len(results),
                         miou=metrics["overall"]["miou"])
    report.note = f"multi-class IoU {_fmt(metrics['overall']['miou'])} over {len(results)} scene(s)"
    return report


def _print_existing(path: Path) -> None:
    try:
        print_tables(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the table is a courtesy; the record says the results are complete
