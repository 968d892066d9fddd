"""A stage's output folder is published whole: built privately, swapped in, the user's own files kept."""

from __future__ import annotations

import pytest

from pipeline.records.publish import building, partial_folder, reclaim_partials


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
