"""What a scene's annotated masks depend on, known without running the stage: the annotate stage writes it into
its records, the dataset stage trusts only masks whose record matches it, and decode's space policy frees a
scene's rasters only once the masks for the current config are complete."""

from __future__ import annotations

from pathlib import Path

from pipeline import records
from pipeline.config import Annotation, PipelineConfig
from pipeline.data.layout import Auxiliary, Scene
from pipeline.data.scene_folders import scene_folder

STAGE = "annotate"
OUTPUTS_REQUIRED = ("mask.tif", "coverage.tif")


def mask_folder(config: PipelineConfig, scene: Scene) -> Path:
    return scene_folder(config.path("annotated_masks"), scene, config.tiles)


def inputs(scene: Scene, auxiliary: Auxiliary, settings: Annotation) -> list[Path | None]:
    """The files the masks are made from: the bands, and the layers the settings use."""
    layers: list[Path | None] = [*scene.bands.values()]
    if settings.water:
        layers += [auxiliary.layers.get("lakes"), auxiliary.layers.get("surface_water")]
    if settings.glacier:
        layers.append(auxiliary.layers.get("glacier"))
    if settings.exolabs_snow:
        layers.append(scene.exolabs)
    return layers


def record_key(scene: Scene, config: PipelineConfig, auxiliary: Auxiliary) -> records.RecordKey:
    """The record key of a scene's masks: their input files and the annotation section."""
    return records.key_for(STAGE, config, inputs(scene, auxiliary, config.annotation), "annotation", scene.tile)


def masks_complete(config: PipelineConfig, scene: Scene, auxiliary: Auxiliary) -> bool:
    return records.is_complete(mask_folder(config, scene), record_key(scene, config, auxiliary),
                               required=OUTPUTS_REQUIRED)
