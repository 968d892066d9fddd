"""A user's mistakes, met through the real `snowpipe` command: each is one plain line naming the file, key or
variable and the fix, with a non-zero exit code that is never 70 (70 means a bug in snowpipe)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from tests.builders import write_auxiliary, write_scene
from tests.requirements import need_private_mounts

ROOT = Path(__file__).resolve().parents[1]


def snowpipe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return the exit code and stderr, which never holds a traceback."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def one_error_line(err: str) -> str:
    """The error, which must be exactly one line starting with `error:`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def config_file(folder: Path, text: str | bytes) -> Path:
    path = folder / "pipeline-config.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- the config file ------------------------------------------------------------------------------------------

def test_a_repeated_section_is_refused_with_both_lines(tmp_path, capsys):
    """Today YAML keeps the second `training:` and silently resets epochs to the default."""
    path = config_file(tmp_path, "tile_id: 32TNS\ntraining:\n  epochs: 5\ndataset:\n  seed: 1\n"
                                 "training:\n  enable: true\n  lr_patience: 2\n  lr_patience: 3\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert f"error: {path} is invalid (2 problem(s)):" in err
    assert "  training: section given twice, on lines 2 and 6; YAML would keep only the second" in err
    assert "  training.lr_patience: key given twice, on lines 8 and 9" in err


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text (byte 0x89 at position 0)"),
    (b"tile_id: 32TNS\n\x00\x01\x02", "not a text file (character #x0000 at position 15)"),
])
def test_a_binary_config_file_is_named_not_an_internal_error(tmp_path, capsys, content, message):
    path = config_file(tmp_path, content)
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert one_error_line(err).startswith(f"error: {path}: {message}")


@pytest.mark.parametrize(("value", "problem"), [
    ("2021-13-45", "2021-13-45 reads as a calendar date but is not a valid one (month must be in 1..12)"),
    ("2021-01-11", "2021-01-11 reads as a calendar date; write scene dates as date keys like 20210111T102309"),
])
def test_an_unquoted_date_is_named_with_its_line(tmp_path, capsys, value, problem):
    path = config_file(tmp_path, f"tile_id: 32TNS\ninference:\n  dates:\n    - 20220301T102309\n    - {value}\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert one_error_line(err).startswith(f"error: {path} line 5: inference.dates.1: {problem}")


def test_a_negative_seed_fails_validation_not_the_dataset_stage(tmp_path, capsys):
    path = config_file(tmp_path, "tile_id: 32TNS\ndataset:\n  seed: -5\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2 and "  dataset.seed: expected a number >= 0, got -5" in err


def test_a_halo_larger_than_the_window_is_refused_naming_both_keys(tmp_path, capsys):
    """halo > window reads ~45x the pixels it predicts, silently; now it is a config error."""
    path = config_file(tmp_path, "tile_id: 32TNS\ninference:\n  window: 128\n  halo: 512\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert "  inference: halo (512) must be at most half of window (128)" in err
    assert "lower inference.halo" in err and "raise inference.window" in err


# --- validate checks what a run would check --------------------------------------------------------------------

def test_validate_names_dates_matching_no_scene_and_folders_without_bands(tmp_path, capsys):
    extracted = tmp_path / "extracted_data"
    write_scene(extracted, "20220301T102309")
    broken = write_scene(extracted, "20220310T102309", skip_bands=("B03", "B8A"))
    write_auxiliary(extracted)
    path = config_file(tmp_path, "tile_id: 32TNS\npaths: {extracted_data: extracted_data}\n"
                                 "inference: {dates: ['20990101T000000']}\ntesting: {dates: ['20990102T000000']}\n"
                                 "dataset: {validation_dates: ['20990103T000000']}\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert f"error: {path} is invalid (4 problem(s)):" in err
    for key, date in (("inference.dates", "20990101T000000"), ("testing.dates", "20990102T000000"),
                      ("dataset.validation_dates", "20990103T000000")):
        assert f"  {key}: {date} match(es) no scene of tile 32TNS in {extracted}" in err
    assert f"  {broken}: band(s) B03, B8A missing" in err and "re-extract the product zip" in err


# --- the command line -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "message"), [
    ("training.epochs", "--set 'training.epochs': expected KEY=VALUE"),
    ("training.epochs=[1", "--set 'training.epochs=[1': not valid YAML: expected ',' or ']'"),
    ("training.epochs.max=1", "--set 'training.epochs.max=1': training.epochs is a value (60), not a section"),
    ("training..epochs=1", "--set 'training..epochs=1': expected KEY=VALUE with a dotted key"),
])
def test_a_malformed_set_is_one_line(tmp_path, capsys, setting, message):
    path = config_file(tmp_path, "tile_id: 32TNS\n")
    code, err = snowpipe(capsys, "stage", "annotate", str(path), "--set", setting)
    assert code == 2
    assert one_error_line(err).startswith(f"error: {message}")


@pytest.mark.parametrize("task", ["abc", "-1", ""])
def test_a_malformed_slurm_array_task_id_is_named(tmp_path, capsys, monkeypatch, task):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
    code, err = snowpipe(capsys, "stage", "annotate", str(config_file(tmp_path, "tile_id: 32TNS\n")))
    assert code == 1
    assert one_error_line(err).startswith(f"error: SLURM_ARRAY_TASK_ID={task!r}: expected the array index")


def test_an_array_task_beyond_the_scenes_is_named(tmp_path, capsys, monkeypatch):
    write_scene(tmp_path / "extracted_data")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    path = config_file(tmp_path, "tile_id: 32TNS\npaths: {extracted_data: extracted_data}\n")
    code, err = snowpipe(capsys, "stage", "annotate", str(path))
    assert code == 1
    assert one_error_line(err).startswith("error: SLURM_ARRAY_TASK_ID=3 but only 1 scene(s) exist")


@pytest.mark.parametrize("scene", ["", "2022-03-01", "20220301", "20220301T102309,", ",20220301T102309"])
def test_an_empty_or_malformed_scene_never_means_every_scene(tmp_path, capsys, scene):
    path = config_file(tmp_path, "tile_id: 32TNS\n")
    code, err = snowpipe(capsys, "stage", "annotate", str(path), "--scene", scene)
    assert code == 2
    assert one_error_line(err) == (f"error: --scene {scene!r}: expected a scene id such as 32TNS_20210111T102309 "
                                   f"or a sensing time such as 20210111T102309 (or several, comma-separated); leave "
                                   f"--scene out to process every scene")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


def test_help_works_for_every_command(capsys):
    commands = _commands(build_parser())
    assert ("validate",) in commands and ("demo-data",) in commands
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0, command
        assert "usage: snowpipe" in capsys.readouterr().out


# --- demo-data --------------------------------------------------------------------------------------------------

def test_demo_data_into_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = snowpipe(capsys, "demo-data", str(target))
    assert code == 1
    assert one_error_line(err) == f"error: demo-data: {target} is a file; pass a new or empty folder"
    assert target.read_text() == "mine"


def test_demo_data_keeps_a_project_unless_forced(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    mine = config_file(project, "tile_id: 32TNS  # my settings\n")
    code, err = snowpipe(capsys, "demo-data", str(project), "--scenes", "1", "--size", "60")
    assert code == 1
    assert one_error_line(err).startswith(f"error: demo-data: {project} is not empty (pipeline-config.yml); "
                                          f"pass a new or empty folder, or --force")
    assert mine.read_text() == "tile_id: 32TNS  # my settings\n"
    code, _ = snowpipe(capsys, "demo-data", str(project), "--scenes", "1", "--size", "60", "--force")
    assert code == 0 and "written by `snowpipe demo-data`" in mine.read_text()


def test_make_demo_targets_stay_rerunnable():
    """`make demo` and `make demo-local` write into the same folder every time: they must pass --force."""
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines() if "demo-data $(DEMO)" in line]
    assert len(lines) == 2 and all(line.rstrip().endswith("--force") for line in lines)


# --- a full disk or a read-only folder -----------------------------------------------------------------------

def on_tmpfs(folder: Path, options: str, fill: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `snowpipe ARGS` with a real tmpfs mounted on `folder` (mount options; filled to the last byte) in a
    private mount namespace (where there is none: a skip here, a failure under CI)."""
    need_private_mounts()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; '
              'if [ "$3" = 1 ]; then dd if=/dev/zero of="$2/fill" bs=4k 2>/dev/null; fi; shift 3; exec "$@"')
    folder.mkdir(exist_ok=True)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", options, str(folder), str(int(fill)),
                             sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 99, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_a_read_only_folder_is_one_line_not_an_internal_error(tmp_path):
    folder = tmp_path / "readonly"
    result = on_tmpfs(folder, "ro,size=64k", False, "demo-data", str(folder / "demo"), "--scenes", "1",
                      "--size", "60")
    assert result.returncode == 74
    assert one_error_line(result.stderr).startswith(f"error: cannot write {folder / 'demo'}")
    assert "read-only file system; make the folder writable" in result.stderr


def test_a_full_disk_is_one_line_not_an_internal_error(tmp_path):
    """Every block and inode of the tmpfs is used (the root folder and the filler file): mkdir gets ENOSPC."""
    folder = tmp_path / "full"
    result = on_tmpfs(folder, "size=16k,nr_inodes=2", True, "demo-data", str(folder / "demo"), "--scenes", "1",
                      "--size", "60")
    assert result.returncode == 74
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: cannot write {folder / 'demo'}")  # the folder or the first file in it
    assert line.endswith(": no space left; free space there or point the config's paths at a larger disk")


@pytest.mark.parametrize("stage, key", [("decode", "paths.decoded"), ("annotate", "paths.annotated_masks")])
def test_an_output_folder_that_cannot_be_created_is_one_line_not_an_internal_error(tmp_path, capsys, stage, key):
    write_scene(tmp_path / "extracted_data")
    path = config_file(tmp_path, "tile_id: 32TNS\nannotation: {clouds: false, glacier: false, water: false, "
                                 "exolabs_snow: false}\n")
    code, err = snowpipe(capsys, "stage", stage, str(path), "--set", f"{key}=/proc/snowpipe-cannot-be-here")
    assert code == 1, err  # the scene fails with the reason; the stage names it (no traceback, not code 70)
    assert "20220301T102309: cannot create the folder /proc/snowpipe-cannot-be-here" in err
    assert "point the config's paths elsewhere" in err and "internal error" not in err


# --- smaller mistakes: each named, none silently widened ------------------------------------------------------

def test_a_warm_up_longer_than_the_training_is_refused(tmp_path, capsys):
    """warmup_epochs: 8 with epochs: 5 used to train five epochs that never reached the learning rate."""
    path = config_file(tmp_path, "tile_id: 32TNS\ntraining:\n  schedule: cosine\n  epochs: 5\n  warmup_epochs: 8\n")
    code, err = snowpipe(capsys, "validate", str(path))
    assert code == 2
    assert "  training: warmup_epochs (8) must be below epochs (5): the learning rate would still be warming up " \
           "when training ends; lower training.warmup_epochs or raise training.epochs" in err


def test_validate_takes_set_like_the_stages(tmp_path, capsys):
    """What a batch job would run with `--set` can be checked beforehand, with the same overrides."""
    write_scene(tmp_path / "extracted_data")
    write_auxiliary(tmp_path / "extracted_data")
    path = config_file(tmp_path, "tile_id: 32TNS\ntraining:\n  epochs: 5\n  warmup_epochs: 2\n")
    code, err = snowpipe(capsys, "validate", str(path), "--set", "training.epochs=2")
    assert code == 2 and "error: the config with --set overrides is invalid (1 problem(s)):" in err
    assert "training: warmup_epochs (2) must be below epochs (2)" in err
    code, err = snowpipe(capsys, "validate", str(path), "--set", "training.epochs=3", "--set", "training.seed=7")
    assert code == 0, err
    code, err = snowpipe(capsys, "validate", str(path), "--set", "training.epochs")
    assert code == 2 and one_error_line(err).startswith("error: --set 'training.epochs': expected KEY=VALUE")


@pytest.mark.parametrize("stages", ["", ",", " , "])
def test_an_empty_stage_list_never_means_every_stage(tmp_path, capsys, stages):
    write_scene(tmp_path / "extracted_data")
    path = config_file(tmp_path, "tile_id: 32TNS\n")
    code, err = snowpipe(capsys, "run", str(path), "--stages", stages)
    assert code == 2
    assert one_error_line(err) == ("error: --stages names no stage; name some of download, decode, annotate, "
                                   "dataset, train, infer, test (comma-separated), or leave --stages out to run "
                                   "the stages the config enables")
    assert not (tmp_path / "decoded").exists() and not (tmp_path / "annotated_masks").exists()


def test_a_scene_given_twice_is_processed_once(tmp_path, capsys):
    write_scene(tmp_path / "extracted_data", "20220301T102309")
    write_scene(tmp_path / "extracted_data", "20220310T102309")
    path = config_file(tmp_path, "tile_id: 32TNS\n")
    code = main(["stage", "decode", str(path), "--scene", "20220301T102309,20220301T102309"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "decode: 1 done, 0 already complete" in out + err
    assert [p.name[:35] for p in (tmp_path / "decoded").iterdir() if p.is_dir()] == \
        ["S2B_MSIL1C_20220301T102309_N0400_R0"]


def test_a_scene_that_does_not_exist_is_a_usage_error_naming_the_scenes_found(tmp_path, capsys):
    write_scene(tmp_path / "extracted_data", "20220301T102309")
    write_scene(tmp_path / "extracted_data", "20220310T102309")
    path = config_file(tmp_path, "tile_id: 32TNS\n")
    code, err = snowpipe(capsys, "stage", "annotate", str(path), "--scene", "20220301T102309,20990101T000000")
    assert code == 2
    assert one_error_line(err) == (f"error: --scene 20990101T000000: no such scene of tile 32TNS in "
                                   f"{tmp_path / 'extracted_data'}; scenes found: 32TNS_20220301T102309, "
                                   f"32TNS_20220310T102309")
    assert not (tmp_path / "annotated_masks").exists()  # nothing ran, not even the scene that exists


def _config_path_of_kind(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "pipeline-config.yml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/null")
    elif kind == "loop":
        path.symlink_to(tmp_path / "other.yml")
        (tmp_path / "other.yml").symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "moved-away.yml")
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("fifo", "is a named pipe (FIFO), not a file; snowpipe reads the config from a YAML file"),
    ("device", "is a character device, not a file;"),
    ("loop", "is a symlink loop (it leads back to itself); replace the link"),
    ("dangling", "is a symlink to {tmp_path}/moved-away.yml, which does not exist; fix the link"),
])
def test_a_config_that_is_not_a_file_says_what_it_is_and_never_hangs(tmp_path, kind, message):
    """Reading a FIFO waits for a writer forever: the kind is told from os.stat, before anything is opened."""
    path = _config_path_of_kind(tmp_path, kind)
    for command in ("validate", "run"):
        result = subprocess.run([sys.executable, "-m", "pipeline", command, str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result.stderr)
        assert line.startswith(f"error: config file {path} ") and message.format(tmp_path=tmp_path) in line, line
        assert "not found" not in line


def test_dev_null_as_the_config_is_named_not_read_as_empty(capsys):
    code, err = snowpipe(capsys, "validate", "/dev/null")
    assert code == 2
    assert one_error_line(err).startswith("error: config file /dev/null is a character device, not a file")
