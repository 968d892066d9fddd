"""Run stages locally, in pipeline order: what `snowpipe run` and `snowpipe stage` (in batch scripts) call."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import DATE_KEY, PipelineConfig, check_data_folders
from pipeline.data.layout import discover_scenes
from pipeline.errors import ConfigError, DataError, SnowpipeError
from pipeline.progress import say
from pipeline.stages import annotate, dataset, download, evaluate, infer, train
from pipeline.stages.base import StageInfo, StageReport

# Every stage of the pipeline, in order, with the config section that enables it.
PIPELINE_ORDER: dict[str, str] = {
    "download": "download",
    "annotate": "annotation",
    "dataset": "dataset",
    "train": "training",
    "infer": "inference",
    "test": "testing",
}


@dataclass(frozen=True)
class Stage:
    info: StageInfo
    run: Callable[..., StageReport]


# The stages this version implements; the others are not offered (no stubs).
STAGES: dict[str, Stage] = {
    "download": Stage(download.INFO, download.run),
    "annotate": Stage(annotate.INFO, annotate.run),
    "dataset": Stage(dataset.INFO, dataset.run),
    "train": Stage(train.INFO, train.run),
    "infer": Stage(infer.INFO, infer.run),
    "test": Stage(evaluate.INFO, evaluate.run),
}


def unknown_stage(name: str) -> SnowpipeError:
    if name in PIPELINE_ORDER:
        return ConfigError(f"stage {name!r} is not available in this version of snowpipe; "
                           f"available: {', '.join(STAGES)}")
    return ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def select_stages(config: PipelineConfig, requested: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Stages to run in pipeline order, and enabled ones this version cannot run (to tell the user)."""
    if requested:
        for name in requested:
            if name not in STAGES:
                raise unknown_stage(name)
        return [name for name in STAGES if name in requested], []
    enabled = [name for name, section in PIPELINE_ORDER.items() if getattr(config, section).enable]
    return [n for n in enabled if n in STAGES], [n for n in enabled if n not in STAGES]


def stage_dates(config: PipelineConfig, name: str) -> list[str]:
    """The scenes a per-scene stage covers: inference may list its own, the others use `dates`."""
    if name == "infer" and config.inference.dates:
        return config.inference.dates
    return config.dates


def scene_for_task(config: PipelineConfig, scene: str | None, name: str) -> list[str] | None:
    """--scene DATE, or the SLURM array task's scene (index into the stage's sorted scenes), or all."""
    if scene is not None:  # "" must not mean "every scene"
        if not DATE_KEY.fullmatch(scene):
            raise ConfigError(f"--scene {scene!r}: expected a scene date key YYYYMMDDTHHMMSS such as "
                              f"20210111T102309; leave --scene out to process every scene")
        return [scene]
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    index = array_index(task)
    scenes = discover_scenes(config.path("extracted_data"), config.tile_id, stage_dates(config, name))
    if index >= len(scenes):
        raise DataError(f"SLURM_ARRAY_TASK_ID={index} but only {len(scenes)} scene(s) exist "
                        f"(array indices 0-{len(scenes) - 1}); submit with --array=0-{len(scenes) - 1}")
    return [scenes[index].date]


def array_index(task: str) -> int:
    """SLURM_ARRAY_TASK_ID as an index; anything but a whole number >= 0 is named, not a crash."""
    if not re.fullmatch(r"[0-9]+", task.strip()):
        raise SnowpipeError(f"SLURM_ARRAY_TASK_ID={task!r}: expected the array index of this task, a whole "
                            f"number >= 0 (sbatch --array sets it); unset it to run every scene, or pass "
                            f"--scene DATE")
    return int(task)


def run_stages(config: PipelineConfig, names: list[str], dates: list[str] | None = None,
               force: bool = False) -> list[StageReport]:
    problems = check_data_folders(config, names)
    if problems:
        raise DataError("\n".join(problems))
    reports = []
    for name in names:
        stage = STAGES[name]
        say(f"== {name}: {stage.info.summary}")
        report = stage.run(config, dates=dates, force=force)
        say(report.summary())
        reports.append(report)
    return reports
