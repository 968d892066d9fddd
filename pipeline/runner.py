"""Run stages locally, in pipeline order: what `snowpipe run` and `snowpipe stage` (in batch scripts) call.

The stages themselves are declared in pipeline/registry.py; their code is imported when they run.
"""

from __future__ import annotations

import os
import re

from pipeline.config import DATE_KEY, PipelineConfig, check_data_folders
from pipeline.data.layout import discover_scenes
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
    """--scene DATE[,DATE...] (an array task's scenes), or the SLURM array task's scene (index into the
    stage's sorted scenes), or all."""
    if scene is not None:  # "" must not mean "every scene"
        dates = list(dict.fromkeys(scene.split(",")))  # A,A is A once
        if not all(DATE_KEY.fullmatch(date) for date in dates):
            raise ConfigError(f"--scene {scene!r}: expected a scene date key YYYYMMDDTHHMMSS such as "
                              f"20210111T102309 (or several, comma-separated); leave --scene out to process "
                              f"every scene")
        check_scenes_exist(config, dates)
        return dates
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    index = array_index(task)
    scenes = discover_scenes(config.path("extracted_data"), config.tile_id, stage_dates(config, name))
    if index >= len(scenes):
        raise DataError(f"SLURM_ARRAY_TASK_ID={index} but only {len(scenes)} scene(s) exist "
                        f"(array indices 0-{len(scenes) - 1}); submit with --array=0-{len(scenes) - 1}")
    return [scenes[index].date]


def check_scenes_exist(config: PipelineConfig, dates: list[str]) -> None:
    """--scene dates that match no scene are a usage error (exit 2) naming them and the scenes found. Without an
    extracted_data folder the stage's own check names the folder."""
    extracted = config.path("extracted_data")
    if not extracted.is_dir():
        return
    found = [scene.date for scene in discover_scenes(extracted, config.tile_id)]
    unknown = [date for date in dates if date not in found]
    if unknown:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise ConfigError(f"--scene {', '.join(unknown)}: no such scene of tile {config.tile_id} in {extracted}; "
                          f"scenes found: {shown}")


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
