"""Run stages locally, in pipeline order: what `snowpipe run` and `snowpipe stage` (in batch scripts) call.

The stages themselves are declared in pipeline/registry.py; their code is imported when they run.
"""

from __future__ import annotations

import os
import re

from pipeline.config import DATE_KEY, PipelineConfig, check_data_folders
from pipeline.data.layout import SCENE_ID, available, discover_scenes
from pipeline.errors import ConfigError, DataError, SnowpipeError
from pipeline.progress import say
from pipeline.registry import STAGES, enabled, stage_dates
from pipeline.stages.base import StageReport


def unknown_stage(name: str) -> SnowpipeError:
    return ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def select_stages(config: PipelineConfig, requested: list[str] | None = None) -> list[str]:
    """Stages to run in pipeline order: the requested ones, else (None) those the config enables."""
    if requested is not None:
        if not requested:  # `--stages ""` must not mean every stage
            raise ConfigError(f"--stages names no stage; name some of {', '.join(STAGES)} (comma-separated), "
                              f"or leave --stages out to run the stages the config enables")
        for name in requested:
            if name not in STAGES:
                raise unknown_stage(name)
        return [name for name in STAGES if name in requested]
    return enabled(config)


def scene_for_task(config: PipelineConfig, scene: str | None, name: str) -> list[str] | None:
    """--scene ID[,ID...] (an array task's scenes: scene ids, or sensing times meaning every tile's scene then),
    or the SLURM array task's scene (index into the stage's sorted scenes), or all."""
    if scene is not None:  # "" must not mean "every scene"
        ids = list(dict.fromkeys(scene.split(",")))  # A,A is A once
        if not all(DATE_KEY.fullmatch(entry) or SCENE_ID.fullmatch(entry) for entry in ids):
            raise ConfigError(f"--scene {scene!r}: expected a scene id such as 32TNS_20210111T102309 or a sensing "
                              f"time such as 20210111T102309 (or several, comma-separated); leave --scene out to "
                              f"process every scene")
        check_scenes_exist(config, ids)
        return ids
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    index = array_index(task)
    scenes = discover_scenes(config.path("extracted_data"), config.tiles, stage_dates(config, name))
    if index >= len(scenes):
        raise DataError(f"SLURM_ARRAY_TASK_ID={index} but only {len(scenes)} scene(s) exist "
                        f"(array indices 0-{len(scenes) - 1}); submit with --array=0-{len(scenes) - 1}")
    return [scenes[index].id]


def check_scenes_exist(config: PipelineConfig, ids: list[str]) -> None:
    """--scene entries that match no scene are a usage error (exit 2) naming them and the scenes found. Without
    an extracted_data folder the stage's own check names the folder."""
    extracted = config.path("extracted_data")
    if not extracted.is_dir():
        return
    found = discover_scenes(extracted, config.tiles)
    known = {scene.id for scene in found} | {scene.date for scene in found}
    unknown = [entry for entry in ids if entry not in known]
    if unknown:
        raise ConfigError(f"--scene {', '.join(unknown)}: no such scene of tile {config.tile_names} in "
                          f"{extracted}; scenes found: {available(found)}")


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
        say(f"== {name}: {stage.summary}")
        report = stage.run(config, dates=dates, force=force)
        say(report.summary())
        reports.append(report)
    return reports
