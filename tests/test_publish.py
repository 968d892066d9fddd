"""A stage's output folder is published whole: built privately, swapped in, the user's own files kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.records.publish import building, partial_folder, reclaim_partials
from tests.builders import TILE, sid, write_auxiliary, write_scene
from tests.requirements import need


def test_a_rebuilt_folder_keeps_the_users_files_but_not_the_stages_old_outputs(tmp_path):
    target = tmp_path / "20220301T102309"
    target.mkdir()
    (target / "notes.txt").write_text("checked by hand")
    (target / "mask.jp2").write_bytes(b"thesis mask")
    (target / "probabilities.tif").write_bytes(b"of the old model")
    with building(target, owned=("*.tif", "*.png")) as partial:
        (partial / "mask.tif").write_bytes(b"new")
        assert not target.joinpath("mask.tif").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["mask.jp2", "mask.tif", "notes.txt"]
    assert (target / "notes.txt").read_text() == "checked by hand"
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("interruption", [RuntimeError("a bug"), KeyboardInterrupt()])
def test_a_failed_or_cancelled_build_publishes_nothing_and_removes_its_folder(tmp_path, interruption):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    with pytest.raises(type(interruption)), building(target) as partial:
        (partial / "manifest.json").write_text('{"new": true}')
        raise interruption
    assert (target / "manifest.json").read_text() == "{}" and not partial_folder(target).exists()


def test_leftovers_of_killed_builds_are_reclaimed_and_a_folder_moved_aside_is_restored(tmp_path, capsys):
    target = tmp_path / "dataset"
    aside = tmp_path / ".dataset.old.tmp"  # killed between the two renames of a swap
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    stale = tmp_path / ".dataset.partial-otherhost-4242"
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"\0" * 100_000)
    assert reclaim_partials(target) > 0
    assert (target / "manifest.json").read_text() == "{}" and not aside.exists() and not stale.exists()
    said = capsys.readouterr()
    assert "restored" in said.out + said.err and "reclaimed" in said.out + said.err


# A swap whose old folder cannot be removed: real annotate runs (the `snowpipe` command) on a small generated scene.

DATE = "20220301T102309"


def annotate_project(root: Path) -> Path:
    write_auxiliary(root, 60)
    write_scene(root, DATE, 60, exolabs=np.full((60, 60), 5, np.uint8))
    config = root / "pipeline-config.yml"
    config.write_text(yaml.safe_dump({
        "tile_id": TILE, "annotation": {"clouds": False, "workers": 1},
        "paths": {"extracted_data": ".", "annotated_masks": "masks", "dataset": "dataset", "results": "results"}}))
    return config


def annotate(config: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config), *args],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    return done


def chattr(path: Path, flag: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)


@pytest.fixture
def immutable_ok(tmp_path):
    """A folder where root can make a file immutable (`chattr +i`): tmp_path itself, else a small ext4 image."""
    need(os.geteuid() == 0 and shutil.which("chattr") is not None, "chattr +i needs root and e2fsprogs")
    probe = tmp_path / "probe"
    probe.write_text("")
    if chattr(probe, "+i").returncode == 0:
        chattr(probe, "-i")
        probe.unlink()
        yield tmp_path / "project"
        return
    image, mounted = tmp_path / "ext4.img", tmp_path / "ext4"
    mounted.mkdir()
    with image.open("wb") as handle:
        handle.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    need(not made.returncode and not subprocess.run(["mount", "-o", "loop", str(image), str(mounted)],
                                                     capture_output=True).returncode,
         "this filesystem cannot hold immutable files and no ext4 image could be mounted")
    yield mounted / "project"
    subprocess.run(["umount", "--lazy", str(mounted)], check=True)


def test_an_old_folder_held_by_an_immutable_file_is_named_and_the_published_folder_kept(immutable_ok):
    """The old folder stayed as `.DATE.old.tmp` without a word; the next --force printed "reclaimed" and died
    with exit 70 (the aside name was taken)."""
    project = immutable_ok
    config = annotate_project(project)
    assert annotate(config).returncode == 0
    folder = project / "masks" / sid(DATE)
    notes = folder / "notes.txt"
    notes.write_text("checked by hand")
    aside = folder.with_name(f".{sid(DATE)}.old.tmp")
    chattr(notes, "+i")
    try:
        done = annotate(config, "--force")  # the new masks are published; the old folder cannot go
        assert done.returncode == 0, done.stderr
        warning = next(line for line in done.stderr.splitlines() if "cannot be removed" in line)
        assert f"{folder} is published" in warning and str(aside / "notes.txt") in warning
        assert "Operation not permitted" in warning and "chattr -i" in warning
        assert (folder / "notes.txt").read_text() == "checked by hand"  # the user's file came along
        mask = (folder / "mask.tif").read_bytes()

        done = annotate(config, "--force")  # the aside name is taken: this scene fails, named, and nothing moves
        assert done.returncode == 1, done.stderr
        line = next(line for line in done.stderr.splitlines() if "cannot replace" in line)
        assert str(folder) in line and str(aside / "notes.txt") in line and "is kept as it was" in line
        assert "reclaimed" not in done.stderr and "(no scene finished" in done.stderr
        assert (folder / "mask.tif").read_bytes() == mask and (folder / ".snowpipe-complete.json").exists()
        assert not list(folder.parent.glob(".*.partial-*"))
    finally:
        chattr(aside / "notes.txt", "-i")
        chattr(notes, "-i")
    done = annotate(config, "--force")  # once the file may go, everything is as usual
    assert done.returncode == 0, done.stderr
    assert not aside.exists() and "reclaimed" in done.stderr


def test_a_symlinked_scene_folder_is_replaced_without_a_stray_link_or_touching_where_it_pointed(tmp_path, capsys):
    """A stray `.DATE.old.tmp` symlink used to remain, and the next --force died with exit 70."""
    config = annotate_project(tmp_path)
    elsewhere = tmp_path / "elsewhere" / sid(DATE)
    elsewhere.mkdir(parents=True)
    (elsewhere / "mask.tif").write_bytes(b"an old mask of the user's")
    (elsewhere / "notes.txt").write_text("checked by hand")
    folder = tmp_path / "masks" / sid(DATE)
    folder.parent.mkdir()
    folder.symlink_to(elsewhere, target_is_directory=True)
    aside = folder.with_name(f".{sid(DATE)}.old.tmp")
    for _ in range(2):
        done = annotate(config, "--force")
        assert done.returncode == 0, done.stderr
        assert folder.is_dir() and not folder.is_symlink() and not os.path.lexists(aside)
        assert (folder / "notes.txt").read_text() == "checked by hand"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mask.tif", "notes.txt"]
    assert (elsewhere / "mask.tif").read_bytes() == b"an old mask of the user's"

    aside.symlink_to(elsewhere, target_is_directory=True)  # what an earlier snowpipe left
    assert reclaim_partials(folder) == 0
    assert not os.path.lexists(aside) and (elsewhere / "notes.txt").exists()
    said = capsys.readouterr()
    assert "reclaimed" not in said.out + said.err
