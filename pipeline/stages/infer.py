"""Stage 5, infer: predict whole scenes with the trained U-Net and write class masks on the 10 m grid.

Each scene is read in large windows with a halo of context and predicted window by window (see
pipeline/inference/tiling.py), so memory depends on the window, never on the scene. Outputs go to
{results}/predictions/{date}/: mask.tif (255 outside coverage), optional probabilities.tif, quicklooks,
then the completion record.
"""

from __future__ import annotations

import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.bands import CLASS_NAMES, NODATA
from pipeline.config import PipelineConfig
from pipeline.data.decoded import DecodedScene
from pipeline.data.layout import Auxiliary, Scene, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.data.writer import atomic_raster
from pipeline.errors import SceneError
from pipeline.inference.native import device_input
from pipeline.inference.outputs import QuicklooksBeside
from pipeline.inference.predictor import Predictor, pick_device
from pipeline.inference.source import scene_input
from pipeline.inference.tiling import WindowPrediction, fit_batch, predict_windows, window_for
from pipeline.inference.write_behind import write_behind
from pipeline.model.busy import write_busy
from pipeline.model.checkpoint import check_compatible, load_model
from pipeline.records.per_output import produce
from pipeline.records.prediction import (
    OUTPUTS_REQUIRED,
    checkpoint_path,
    data_channels,
    prediction_folder,
    record_key,
)
from pipeline.registry import STAGES, stage_dates
from pipeline.stages.base import (
    ProgressCallback,
    SceneOutcome,
    StageReport,
    raise_if_failed,
    run_scenes,
    usable_cpus,
)
from pipeline.stages.decode import discover_readable, release_if_used

__all__ = ["checkpoint_path", "data_channels", "infer_scene", "load_predictor", "run"]

INFO = STAGES["infer"]


def reader_threads(device: torch.device) -> int:
    """Reading is often slower than the forward pass on a GPU (JPEG 2000 always), so read in parallel there.

    GDAL and numpy release the GIL; when the model is the slower side, idle readers wait on the bounded queue.
    On a CPU the model's own threads use every core: one reader per 4 cores leaves them be (two readers on
    2 cores slowed the forward pass more than they read).
    """
    cpus = usable_cpus()
    if device.type == "cpu":
        return max(1, cpus // 4)
    return max(1, min(8, cpus - 1 if cpus > 2 else cpus))


@dataclass
class LoadedModel:
    """The network ready to predict, and what identifies it in completion records."""

    predictor: Predictor
    normaliser: Normaliser
    path: Path
    readers: int = 1
    batches: dict[int, int] = field(default_factory=dict)  # window side -> fitted batch (batch_size: 0)

    def batch_for(self, window: int, halo: int, height: int, width: int) -> int:
        """Windows per forward pass for inner windows of this size, measured once per run."""
        if window not in self.batches:
            side = min(window + 2 * halo, max(height, width))
            padded = -(-side // self.predictor.multiple) * self.predictor.multiple
            windows = (-(-height // window)) * (-(-width // window))
            self.batches[window] = fit_batch(self.predictor, self.predictor.in_channels, padded, padded,
                                             limit=max(1, windows))
        return self.batches[window]


def load_predictor(config: PipelineConfig) -> LoadedModel:
    """Load and check the checkpoint once per run (every scene uses the same model)."""
    settings = config.inference
    path = checkpoint_path(config)
    device = pick_device(settings.device)
    model, state = load_model(path, device)
    check_compatible(state, data_channels(config), list(CLASS_NAMES), path)
    normaliser = Normaliser.from_dict(state["normalisation"])
    predictor = Predictor(model, device, tta=settings.tta)
    return LoadedModel(predictor, normaliser, path, reader_threads(device))


def infer_scene(scene: Scene, config: PipelineConfig, loaded: LoadedModel, force: bool = False,
                on_window: ProgressCallback | None = None) -> SceneOutcome:
    """Write {results}/predictions/{date}/mask.tif (and the optional outputs) with the completion record,
    built in a private folder and published in one swap, under the scene's lock."""
    start = time.perf_counter()
    if scene.decoded_problem:
        raise SceneError(scene.id, scene.decoded_problem)
    auxiliary = find_auxiliary(config.path("extracted_data"), scene.tile)
    details = produce(prediction_folder(config, scene), record_key(config, scene, auxiliary),
                      lambda partial: _predict(scene, config, loaded, auxiliary, partial, on_window),
                      what=f"infer {scene.id}", required=OUTPUTS_REQUIRED, owned=("*.tif", "*.png"), force=force)
    outcome = SceneOutcome(scene.id, "skipped") if details is None else \
        SceneOutcome(scene.id, "done", time.perf_counter() - start, details=details)
    release_if_used(config, scene)
    return outcome


def _predict(scene: Scene, config: PipelineConfig, loaded: LoadedModel, auxiliary: Auxiliary, out_dir: Path,
             on_window: ProgressCallback | None) -> dict:
    """mask.tif, the optional probabilities and quicklooks of one scene into `out_dir`; the record's summary."""
    settings = config.inference
    classes = len(CLASS_NAMES)
    counts = np.zeros(256, np.int64)
    # Decoded rasters (the decode stage) are fast to read window by window; without them, decode_once decodes
    # the JPEG 2000 bands once into scratch instead of once per window (the fallback).
    decoding = DecodedScene(scene, scene.tile) if settings.decode_once and not scene.decoded else nullcontext()
    predictor = loaded.predictor
    # The quicklooks' composites are made on their own thread while the windows are predicted.
    quicklooks = QuicklooksBeside(out_dir, scene, scene.tile, auxiliary) if settings.quicklooks else None
    with decoding as decoded, SceneReader(scene, scene.tile, auxiliary) as reader, \
            quicklooks or nullcontext():
        grid = reader.grid
        if scene.decoded:  # native bands read on the host; resampled and normalised on the device
            source = device_input(scene, scene.tile, auxiliary, loaded.normaliser, predictor.device)
        else:
            source = scene_input(scene, scene.tile, auxiliary, loaded.normaliser, decoded)
        window = window_for(settings.window, grid.height, grid.width, settings.halo)
        # closed on every way out (a failed write, an error, Ctrl-C): its reading threads end with the scene
        windows = closing(predict_windows(
            source, grid.height, grid.width, predictor, window, settings.halo,
            settings.batch_size or loaded.batch_for(window, settings.halo, grid.height, grid.width),
            loaded.readers, probabilities=settings.save_probabilities, on_window=on_window,
        ))
        probabilities = atomic_raster(out_dir / "probabilities.tif", grid.geotiff_profile(
            "uint8", None, count=classes)) if settings.save_probabilities else nullcontext()
        with windows as predictions, \
                atomic_raster(out_dir / "mask.tif", grid.geotiff_profile("uint8", NODATA)) as mask_out, \
                probabilities as prob_out:

            def write(result: WindowPrediction) -> None:
                nonlocal counts
                counts += _write_window(mask_out, result)
                if prob_out is not None:
                    assert result.probabilities is not None
                    result.probabilities[:, ~result.valid] = 0
                    prob_out.write(result.probabilities, window=result.core)

            write_behind(predictions, write)
        if quicklooks is not None:
            quicklooks.finish(out_dir / "mask.tif")
    valid = counts[:classes].sum()
    return {
        "coverage": round(float(valid / max(counts.sum(), 1)), 4),
        "class_fraction": [round(float(c / max(valid, 1)), 4) for c in counts[:classes]],
        "checkpoint": str(loaded.path),
    }


def _write_window(mask_out, result) -> np.ndarray:
    """Write one core's classes (255 outside coverage) and return its class histogram."""
    mask = result.classes
    mask[~result.valid] = NODATA
    mask_out.write(mask, 1, window=result.core)
    return np.bincount(mask.ravel(), minlength=256)


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    """Predict the selected scenes: `dates`, else inference.dates, else the config's dates (all by default)."""
    start = time.perf_counter()
    wanted = stage_dates(config, INFO.name, dates)
    scenes = discover_readable(config, wanted, redecode=False)  # a GPU job does only GPU work
    loaded = load_predictor(config)  # a missing or mismatched checkpoint stops the stage before any scene
    report = StageReport(INFO.name, output=str(config.path("results") / "predictions"),
                         note=f"{loaded.path.name} on {loaded.predictor.device}")
    run_scenes(report, scenes, lambda scene, on_window: infer_scene(scene, config, loaded, force, on_window))
    write_busy(config.path("results"), INFO.name, loaded.predictor.busy)  # the GPU's busy fraction: snowpipe report
    report.seconds = time.perf_counter() - start
    raise_if_failed(report)
    return report
