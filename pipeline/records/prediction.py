"""What a scene's predictions depend on, computable without loading the model (so the test stage can
check that a prediction is complete and made by the current checkpoint without importing torch)."""

from __future__ import annotations

from pathlib import Path

from pipeline import records
from pipeline.bands import BANDS
from pipeline.config import PipelineConfig
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.scene_folders import scene_folder

STAGE = "infer"
OUTPUTS_REQUIRED = ("mask.tif",)


def checkpoint_path(config: PipelineConfig) -> Path:
    """"best" and "last" are the training stage's checkpoints; anything else is a path."""
    name = config.inference.checkpoint
    if name in ("best", "last"):
        return config.path("results") / "training" / f"{name}.pt"
    path = Path(name).expanduser()
    return path if path.is_absolute() else (Path(config.base_dir) / path).resolve()


def data_channels(config: PipelineConfig) -> list[str]:
    """The input channels this data provides to a model: the 13 bands, and the DEM where the dataset uses it."""
    return [*BANDS, "DEM"] if config.dataset.include_dem else list(BANDS)


def prediction_folder(config: PipelineConfig, scene: Scene) -> Path:
    return scene_folder(config.path("results") / "predictions", scene, config.tiles)


def record_key(config: PipelineConfig, scene: Scene, auxiliary: Auxiliary) -> records.RecordKey:
    """The scene's bands, the checkpoint file and (when the model reads it) the DEM, and the inference section."""
    files: list[Path | None] = [*scene.bands.values(), checkpoint_path(config)]
    if config.dataset.include_dem:
        files.append(auxiliary.layers.get("dem"))
    return records.key_for(STAGE, config, files, "inference", scene.tile)


def prediction_trusted(config: PipelineConfig, scene: Scene, auxiliary: Auxiliary) -> bool:
    """Whether the scene's predictions are the infer stage's complete output for this data, config and
    checkpoint. Where the checkpoint is not at hand (a test job that staged only the predictions), the record
    must still be an infer record of this config that vouches for its files."""
    folder = prediction_folder(config, scene)
    if checkpoint_path(config).is_file():
        return records.is_complete(folder, record_key(config, scene, auxiliary), required=OUTPUTS_REQUIRED)
    record = records.read_record(folder)
    return record is not None and record.get("stage") == STAGE and \
        record.get("config") == config.section_hash("inference", tile=scene.tile) and records.vouches(folder)
