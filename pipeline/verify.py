"""`snowpipe verify CONFIG [--full]`: is every finished output still what its record vouches for, and made
from the inputs that are there now?

Walks the outputs a config's stages publish (decoded rasters, annotated masks, predictions, test metrics, the
dataset) and checks each record's files: size and samples, and the full content through the hash cache (a file
whose stat changed is hashed again); `--full` hashes every byte. A scene's decoded rasters, masks and
predictions made with the current settings are also checked against their inputs as they are now (a band, an
auxiliary raster or the checkpoint changed or damaged since: out of date). Lists every damaged, missing or
out-of-date output; exit 0 when all are intact, 1 otherwise. `snowpipe verify-data` stays the batch jobs'
check that synced data is what was submitted: the one looks at outputs, the other at inputs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from pipeline import records
from pipeline.config import PipelineConfig, apply_settings, load_config
from pipeline.data.layout import discover_scenes, find_auxiliaries
from pipeline.progress import make_progress, say
from pipeline.records import annotation, prediction
from pipeline.stages import decode


def record_folders(config: PipelineConfig) -> Iterator[Path]:
    """Every folder that holds a completion record: one per scene for decode, annotate and infer, the test
    stage's, the dataset's (its manifest is its record)."""
    results = config.path("results")
    for parent in (config.path("decoded"), config.path("annotated_masks"), results / "predictions"):
        if parent.is_dir():
            yield from sorted(folder for folder in parent.iterdir()
                              if folder.is_dir() and (folder / records.RECORD_NAME).is_file())
    if (results / "testing" / records.RECORD_NAME).is_file():
        yield results / "testing"
    if (config.path("dataset") / records.DATASET_MANIFEST).is_file():
        yield config.path("dataset")


def _recorded_outputs(folder: Path) -> tuple[dict, int | None]:
    """The files a folder's record lists, and the record's schema (None: unreadable)."""
    name = records.DATASET_MANIFEST if (folder / records.DATASET_MANIFEST).is_file() and \
        not (folder / records.RECORD_NAME).is_file() else records.RECORD_NAME
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}, None
    if not isinstance(data, dict) or not isinstance(data.get("outputs", {}), dict):
        return {}, None
    return data.get("outputs", {}), data.get("schema")


def verify(config: PipelineConfig, full: bool = False) -> tuple[int, list[str]]:
    """(folders checked, problems): each problem one line naming the file."""
    folders = list(record_folders(config))
    problems: list[str] = []
    with make_progress() as progress:
        bar = progress.add_task("verify: outputs", total=len(folders))
        for folder in folders:
            outputs, schema = _recorded_outputs(folder)
            if schema is None:
                problems.append(f"{folder}: its completion record cannot be read (rerun the stage that wrote it)")
            else:
                problems += records.output_problems(folder, outputs, full=full)
            progress.advance(bar)
    return len(folders), problems + checkpoint_problems(config, full) + out_of_date(config)


def checkpoint_problems(config: PipelineConfig, full: bool = False) -> list[str]:
    """The training's checkpoints that are not what training wrote (their hashes beside them)."""
    from pipeline.model.checkpoint import checkpoint_problem  # torch: 1.4 s that every other command would pay

    folder = config.path("results") / "training"
    return [f"{path}: {problem}" for path in sorted(folder.glob("*.pt"))
            if (problem := checkpoint_problem(path, full))]


def out_of_date(config: PipelineConfig) -> list[str]:
    """Per scene, the outputs made with the current settings whose inputs are no longer what they were made
    from (changed, damaged or re-extracted since): one line each, naming the stage to rerun."""
    if not config.path("extracted_data").is_dir():
        return []
    auxiliaries = find_auxiliaries(config.path("extracted_data"), config.tiles)
    checkpoint = prediction.checkpoint_path(config).is_file()
    lines = []
    for scene in discover_scenes(config.path("extracted_data"), config.tiles):
        auxiliary = auxiliaries[scene.tile]
        if scene.missing_bands or scene.odd_bands:
            continue  # the stages name those
        candidates: list[tuple[Path, str, Callable[[], records.RecordKey]]] = [
            (decode.decoded_folder(config, scene), "decode", partial(decode.record_key, config, scene)),
            (annotation.mask_folder(config, scene), "annotate",
             partial(annotation.record_key, scene, config, auxiliary))]
        if checkpoint:
            candidates.append((prediction.prediction_folder(config, scene), "infer",
                               partial(prediction.record_key, config, scene, auxiliary)))
        for folder, stage, key_of in candidates:
            record = records.read_record(folder)
            if record is None or record.get("stage") != stage or record.get("schema") != records.SCHEMA:
                continue
            key = key_of()
            if record.get("config") == key.config and record.get("inputs") != key.inputs:
                lines.append(f"{folder}: out of date: its inputs changed since it was made "
                             f"(rerun `snowpipe stage {stage} CONFIG --scene {scene.id}`)")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    config = apply_settings(load_config(args.config), args.set or [])
    checked, problems = verify(config, full=args.full)
    how = "every byte hashed" if args.full else "sizes, samples and changed files hashed"
    if problems:
        say(f"verify: {len(problems)} damaged, missing or out-of-date output(s) in {checked} output folder(s) "
            f"({how}):")
        for line in problems:
            say(f"  {line}")
        say("rerun the stage that wrote each (it redoes damaged outputs: `snowpipe run` or `snowpipe stage NAME`)")
        return 1
    say(f"verify: {checked} output folder(s) intact ({how})")
    return 0


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every finished output against its completion record",
                       description="List every damaged, missing or out-of-date output of the config's stages "
                                   "(decoded rasters, masks, predictions, metrics, the dataset, the checkpoints; out "
                                   "of date: its inputs changed since); exit 0 when all are intact, 1 otherwise.")
    p.add_argument("config", nargs="?", help="config file (default: ./pipeline-config.yml)")
    p.add_argument("--full", action="store_true", help="hash every byte, not only files whose stat changed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=cmd_verify)
