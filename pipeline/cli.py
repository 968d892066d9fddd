"""The `snowpipe` command: validate, demo-data, run, stage. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from contextlib import suppress
from pathlib import Path

from pipeline import __version__
from pipeline.config import apply_settings, check_data_folders, checked_scenes, invalid, load_config
from pipeline.contract.formats import EXIT_INTERRUPTED
from pipeline.data.layout import select_dates, superseded_notes
from pipeline.data.writer import write_json
from pipeline.errors import ConfigError, SnowpipeError, output_error
from pipeline.interrupts import stop_now
from pipeline.locks import release_abandoned
from pipeline.progress import say


def _stage_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_validate(args: argparse.Namespace) -> int:
    # before importing the stages (and torch): a config error is instant; --set as the stages take it
    config = apply_settings(load_config(args.config), args.set or [])
    from pipeline.runner import select_stages

    stages = select_stages(config)
    scenes, scene_problems = checked_scenes(config, stages)  # one discovery: the checks and the count
    problems = check_data_folders(config, stages) + scene_problems
    if problems:
        raise invalid(args.config or "pipeline-config.yml", problems)
    found = ""
    if scenes:  # found where extracted_data is there and download does not run: at least one, or a problem
        found = f", {len(select_dates(scenes, config.path('extracted_data'), config.dates))} scene(s)"
    from pipeline.submit.jobspec import load_jobs
    from pipeline.submit.plan import REPO_ROOT

    specs = sorted((REPO_ROOT / "jobs").glob("*.yml"))
    for spec in specs:  # a broken job spec fails here, not at submission
        load_jobs(spec.parent, spec.stem)
    found += f", {len(specs)} job spec(s) valid" if specs else ""
    for note in superseded_notes(scenes):
        say(f"note: {note}")
    tiles = f"{len(config.tiles)} tiles" if len(config.tiles) > 1 else f"tile {config.tiles[0]}"
    print(f"{args.config or 'pipeline-config.yml'} is valid: {tiles}{found}, "
          f"stages: {', '.join(stages) or 'none'}")
    if args.freeze:
        write_json(Path(args.freeze), config.frozen())
        print(f"resolved config (absolute paths) frozen to {args.freeze}: `snowpipe stage NAME --config "
              f"{args.freeze}` reads it")
    return 0


def check_demo_folder(out: Path, force: bool) -> None:
    """Refuse to write the demo over a file or into a folder with the user's work (a config, ExoLabs files)."""
    existing = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        kind = "a file" if existing.is_file() else "not a folder"
        what = f"is {kind}" if existing == out else f"lies under {existing}, which is {kind}"
        raise SnowpipeError(f"demo-data: {out} {what}; pass a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise SnowpipeError(f"demo-data: {out} is not empty ({shown}); pass a new or empty folder, or --force "
                            f"to write the demo there anyway (it replaces pipeline-config.yml and the demo's "
                            f"scenes and ExoLabs files)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo import generate_demo
    from pipeline.demo.config_file import write_demo_config
    from pipeline.progress import make_progress

    check_demo_folder(Path(args.out), args.force)
    with make_progress() as progress:
        bar = progress.add_task("demo-data: scenes", total=args.scenes * len(args.tiles))

        def on_scene(done: int, total: int, scene: str) -> None:
            progress.update(bar, completed=done, description=f"demo-data: {scene}")

        summary = generate_demo(Path(args.out), scenes=args.scenes, size=args.size, tiles=args.tiles,
                                seed=args.seed, progress=on_scene)
    config_path = write_demo_config(summary)
    say(f"demo-data: {len(summary.scene_ids)} scene(s) of {args.size} px, tile {', '.join(summary.tiles)} "
        f"-> {args.out}")
    say(f"next: snowpipe run {config_path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_stages, select_stages

    config = load_config(args.config)
    stages = select_stages(config, args.stages)
    if not stages:
        say("nothing to run: no available stage is enabled (see the `enable` keys in the config)")
        return 0
    reports = run_stages(config, stages, force=args.force)
    return 1 if any(r.failed for r in reports) else 0


def cmd_stage(args: argparse.Namespace) -> int:
    from pipeline.runner import STAGES, run_stages, scene_for_task, unknown_stage

    if args.name not in STAGES:
        raise unknown_stage(args.name)
    config = apply_settings(load_config(args.config), args.set or [])
    per_scene = STAGES[args.name].per_scene
    if args.scene is not None and not per_scene:
        raise ConfigError(f"stage {args.name} runs over all scenes at once; drop --scene")
    dates = scene_for_task(config, args.scene, args.name) if per_scene else None
    reports = run_stages(config, [args.name], dates=dates, force=args.force)
    return 1 if any(r.failed for r in reports) else 0


def cmd_verify_data(args: argparse.Namespace) -> int:
    """Before a batch job's stage: are the synced files it reads those that were submitted?"""
    from pipeline.data.manifest import verify
    from pipeline.registry import STAGES

    config = load_config(args.config)
    if args.stage not in STAGES:
        raise ConfigError(f"unknown stage {args.stage!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[args.stage]
    # annotated_masks is an input only when this run does not write it (annotation disabled: the user's masks)
    synced = ["extracted_data"] + ([] if config.annotation.enable else ["annotated_masks"])
    folders = {name: config.path(name) for name in synced if stage.folders.get(name) == "r"}
    if not folders:
        say(f"data check: stage {args.stage} reads no synced data")
        return 0
    scene = (config.tiles, args.scene) if args.scene and stage.per_scene else None
    resubmit = (f"resubmit: ansible-playbook submit.yml -e run_id={args.run} -e job={args.job}" if args.run
                else "submit again")
    say(verify(Path(args.manifest), folders, scene, resubmit))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snowpipe",
        description="Sentinel-2 snow / cloud / water segmentation pipeline, from a laptop to a SLURM cluster.",
    )
    parser.add_argument("--version", action="version", version=f"snowpipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check pipeline-config.yml; exit 0 when valid, 2 otherwise",
                       description="Check pipeline-config.yml: keys, types, dates, data folders.")
    p.add_argument("config", nargs="?", help="config file (default: ./pipeline-config.yml)")
    p.add_argument("--freeze", metavar="JSON", help="also write the resolved config (absolute paths) as JSON, "
                                                    "what a batch job reads")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key as `snowpipe stage` does, e.g. training.epochs=5 (repeatable)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("demo-data", help="write synthetic Sentinel-2 scenes, truth and a ready config",
                       description="Write synthetic extracted_data (13-band JPEG 2000 SAFE products, ExoLabs, "
                                   "auxiliary rasters), OUT/truth/ and OUT/pipeline-config.yml.")
    p.add_argument("out", help="output folder")
    p.add_argument("--scenes", type=int, default=3, help="number of scenes per tile (default 3)")
    p.add_argument("--size", type=int, default=480, help="scene size in 10 m pixels (10980 = a full tile)")
    p.add_argument("--tiles", "--tile", type=_stage_list, default=["32TNS"], metavar="T1,T2",
                   help="Sentinel-2 tile ids, comma-separated (default 32TNS); the tiles share their sensing "
                        "times, as one pass's tiles do, and --scenes are written for each")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder (replaces its pipeline-config.yml and demo files)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("run", help="run the enabled stages locally, in order",
                       description="Run the stages enabled in the config (or --stages) on this machine.")
    p.add_argument("config", nargs="?", help="config file (default: ./pipeline-config.yml)")
    p.add_argument("--stages", type=_stage_list, help="comma-separated stages, e.g. annotate,dataset")
    p.add_argument("--force", action="store_true", help="redo outputs that are already complete")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", help="run one stage (what SLURM batch scripts call)",
                       description="Run one stage. Per-scene stages take --scene DATE or, in a job array, "
                                   "the scene at index $SLURM_ARRAY_TASK_ID.")
    p.add_argument("name", help="stage name: annotate, dataset, train, infer, test")
    p.add_argument("config", nargs="?", help="config file (default: ./pipeline-config.yml)")
    p.add_argument("--config", dest="config_option", metavar="PATH",
                   help="config file (same as the positional argument)")
    p.add_argument("--scene", help="scene date key YYYYMMDDTHHMMSS (per-scene stages)")
    p.add_argument("--force", action="store_true", help="redo outputs that are already complete")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. paths.results=/scratch/results (repeatable)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("verify-data", help="check a run's synced data against its manifest (batch jobs run it)",
                       description="Before a stage of a cluster job: the files it will read in the shared data "
                                   "folder must be those submitted (size and sampled content); exit 1 naming "
                                   "the files otherwise.")
    p.add_argument("manifest", help="runs/RUN/data-manifest.json")
    p.add_argument("--config", required=True, help="the run's frozen config.json")
    p.add_argument("--stage", required=True, help="the stage about to run")
    p.add_argument("--scene", help="an array task's scene date: check only its files")
    p.add_argument("--run", help="run id, for the resubmit hint")
    p.add_argument("--job", help="job name, for the resubmit hint")
    p.set_defaults(func=cmd_verify_data)

    from pipeline.localcluster.commands import add_cluster_parser
    from pipeline.monitor.resubmission import add_check_parser
    from pipeline.monitor.tools import add_tool_parsers
    from pipeline.stages.cloud_backend import add_build_parser
    from pipeline.submit.plan_command import add_plan_parser
    from pipeline.verify import add_verify_parser

    add_plan_parser(sub)
    add_verify_parser(sub)
    add_build_parser(sub)
    add_cluster_parser(sub)
    add_tool_parsers(sub)
    add_check_parser(sub)
    return parser


def _merge_config_option(args: argparse.Namespace) -> None:
    """`snowpipe stage NAME --config PATH` (what batch scripts write) equals the positional form."""
    if getattr(args, "config_option", None):
        args.config = args.config_option


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SLURM cancels and times out jobs with SIGTERM, a closed terminal sends SIGHUP, a user Ctrl-C: each unwinds
    # as KeyboardInterrupt, so temporary outputs are removed, once a clean-up under way ends (pipeline/interrupts.py).
    signal.signal(signal.SIGTERM, stop_now)
    for number in (signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(number) is not signal.SIG_IGN:  # nohup's (or a background shell's) choice stands
            signal.signal(number, stop_now)
    try:
        _merge_config_option(args)
        return args.func(args)
    except SnowpipeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, unfinished ones were not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a user error: one line, the traceback on request
        if args.debug:
            raise
        error = output_error(exc, "an output folder") if isinstance(exc, OSError) else None
        if error is not None:  # a full disk or a read-only folder is the user's to fix, not a bug
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 70
    finally:
        with suppress(KeyboardInterrupt):  # a second stop meanwhile: the locks are released all the same
            release_abandoned()  # a lock whose release a stop cut short (pipeline/locks.py)


if __name__ == "__main__":
    sys.exit(main())
