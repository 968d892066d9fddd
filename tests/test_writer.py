"""Atomic outputs: a crash leaves nothing that looks complete; a finished file appears whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.data.grid import Grid
from pipeline.data.preview import write_png
from pipeline.data.raster_checks import verify_raster
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.data.writer import (
    FILE_MODE,
    atomic_path,
    atomic_raster,
    remove_temporaries,
    swap_folder,
    write_json,
)


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.tif"
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_raster_keeps_the_previous_complete_file(tmp_path):
    from affine import Affine

    x, y = tile_origin("32TNS")
    grid = Grid(tile_crs("32TNS"), Affine(10, 0, x, 0, -10, y), 300, 300)
    target = tmp_path / "mask.tif"
    with atomic_raster(target, grid.geotiff_profile("uint8", 255)) as out:
        out.write(np.ones((300, 300), np.uint8), 1)
    with pytest.raises(KeyboardInterrupt), atomic_raster(target, grid.geotiff_profile("uint8", 255)) as out:
        out.write(np.zeros((300, 300), np.uint8), 1)
        raise KeyboardInterrupt
    with rasterio.open(target) as done:
        assert (done.read(1) == 1).all() and done.profile["tiled"] and done.compression.value == "DEFLATE"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]


def grid_profile(size: int = 700, count: int = 1) -> dict:
    from affine import Affine

    x, y = tile_origin("32TNS")
    return Grid(tile_crs("32TNS"), Affine(10, 0, x, 0, -10, y), size, size).geotiff_profile("uint8", 255, count)


def test_rasters_written_window_by_window_side_by_side_read_back_whole(tmp_path):
    """What annotate and infer do: two rasters open at once, filled in windows that do not match the blocks."""
    mask = np.random.default_rng(0).integers(0, 4, (700, 700), dtype=np.uint8)
    probabilities = np.random.default_rng(1).integers(0, 255, (4, 700, 700), dtype=np.uint8)
    with atomic_raster(tmp_path / "mask.tif", grid_profile()) as mask_out, \
            atomic_raster(tmp_path / "probabilities.tif", grid_profile(count=4)) as prob_out:
        for row in range(0, 700, 300):
            for col in range(0, 700, 300):
                window = Window(col, row, min(300, 700 - col), min(300, 700 - row))
                mask_out.write(mask[row:row + 300, col:col + 300], 1, window=window)
                prob_out.write(probabilities[:, row:row + 300, col:col + 300], window=window)
    with rasterio.open(tmp_path / "mask.tif") as done, rasterio.open(tmp_path / "probabilities.tif") as probs:
        assert (done.read(1) == mask).all() and (probs.read() == probabilities).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif", "probabilities.tif"]
    assert (tmp_path / "mask.tif").stat().st_mode & 0o777 == FILE_MODE


def test_the_read_back_refuses_a_truncated_or_misshapen_geotiff(tmp_path):
    target = tmp_path / "mask.tif"
    with atomic_raster(target, grid_profile()) as out:
        out.write(np.random.default_rng(0).integers(0, 4, (700, 700), dtype=np.uint8), 1)
    assert verify_raster(target, grid_profile()) is None
    assert "reads back as 700x700 px, 1 band(s) of uint8, not 700x700 px, 4 band(s)" in \
        verify_raster(target, grid_profile(count=4))
    with target.open("r+b") as handle:
        handle.truncate(target.stat().st_size - 1000)
    assert "the file ends at byte" in verify_raster(target, grid_profile())


def test_a_bug_in_the_writing_code_stays_a_bug_and_publishes_nothing(tmp_path):
    """Only write failures become OutputError; writing a band the raster does not have is not a full disk."""
    with pytest.raises(IndexError), atomic_raster(tmp_path / "mask.tif", grid_profile()) as out:
        out.write(np.zeros((700, 700), np.uint8), 2)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_input_inside_a_write_is_not_called_an_output_problem(tmp_path):
    with pytest.raises(PermissionError), atomic_path(tmp_path / "out" / "table.csv"):
        raise PermissionError(13, "Permission denied", "/data/S2/B04.jp2")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_json_and_png_are_published_whole_without_sidecars(tmp_path):
    write_json(tmp_path / "record.json", {"stage": "annotate", "coverage": 0.93})
    assert json.loads((tmp_path / "record.json").read_text()) == {"stage": "annotate", "coverage": 0.93}
    picture = np.random.default_rng(0).integers(0, 255, (3, 60, 90), dtype=np.uint8)
    write_png(tmp_path / "preview.png", picture)
    with rasterio.open(tmp_path / "preview.png") as png:
        assert (png.read() == picture).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "record.json"]


def test_a_folder_swap_replaces_the_old_folder_and_cleans_up(tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "old.npy").write_text("old")
    (tmp_path / ".dataset.partial").mkdir()
    (tmp_path / ".dataset.partial" / "new.npy").write_text("new")
    swap_folder(tmp_path / ".dataset.partial", tmp_path / "dataset")
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["new.npy"]


def test_cleaning_temporaries_spares_a_folder_moved_aside(tmp_path):
    """After a crash inside swap_folder, `.NAME.old.tmp` may be the only complete copy: never deleted here."""
    (tmp_path / ".mask.tif.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".mask.tif.abc123.tmp.aux.xml").write_text("<PAMDataset/>")
    (tmp_path / ".scene.old.tmp").mkdir()
    remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".scene.old.tmp"]


def test_a_file_reaches_the_disk_before_its_name_and_the_rename_after_it(tmp_path, monkeypatch):
    """A node crash right after a publish must not leave a complete-looking file of zeros: the file's bytes
    are synced before the rename, and the folder (the rename) after it. The real calls run; we watch them."""
    import os

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target) -> None:
        calls.append(f"rename {os.path.basename(target)}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json(tmp_path / "record.json", {"stage": "test"})
    assert calls[0].startswith("fsync .record.json.") and calls[1:] == ["rename record.json", f"fsync {tmp_path.name}"]
    assert json.loads((tmp_path / "record.json").read_text()) == {"stage": "test"}
