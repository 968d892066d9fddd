"""A full disk or a read-only folder: every writer says so in one line and publishes nothing.

Each test mounts a real, small tmpfs (so we need root; elsewhere they skip, and fail under CI), fills it as a long
run would, and checks what a user would find: one OutputError line (exit 74) naming the file and the
fix, no temporary file left, and the previous complete output, if any, still there and readable.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from pipeline import plots
from pipeline.data import writer
from pipeline.data.preview import write_png
from pipeline.data.writer import allocate_npy, atomic_path, atomic_raster, swap_folder, write_json
from pipeline.errors import OutputError
from pipeline.inference.outputs import write_overlay_png
from tests.requirements import need, need_root

FULL = "no space left"
READ_ONLY = "read-only file system"


def mount_tmpfs(folder: Path, size: str) -> None:
    need_root("mounting a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    need(done.returncode == 0, f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        gc.collect()  # a memory map the test still held
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def disk(tmp_path):
    """A real 64 KiB filesystem: far too small for a 1000 x 1000 raster of noise."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, "64k")
    yield folder
    unmount(folder)


@pytest.fixture
def big_disk(tmp_path):
    folder = tmp_path / "big"
    mount_tmpfs(folder, "8m")
    yield folder
    unmount(folder)


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Take all but `leave` bytes of the folder's filesystem, as other files of a long run would."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize - leave
    if free > 0:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, free)
        finally:
            os.close(fd)


def profile(size: int, count: int = 1) -> dict:
    return {"driver": "GTiff", "dtype": "uint8", "count": count, "width": size, "height": size,
            "crs": "EPSG:32632", "transform": Affine(10, 0, 600000, 0, -10, 5200000), "compress": "deflate",
            "nodata": 255, "tiled": True, "blockxsize": 256, "blockysize": 256}


def noise(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)


def assert_one_line(error: pytest.ExceptionInfo, *words: str) -> str:
    message = str(error.value)
    assert isinstance(error.value, OutputError) and error.value.exit_code == 74
    assert "\n" not in message and message.startswith("cannot write ")
    for word in words:
        assert word in message, message
    return message


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


def write_small_mask(target: Path) -> None:
    with atomic_raster(target, profile(16)) as out:
        out.write(np.full((16, 16), 3, np.uint8), 1)


@pytest.mark.parametrize("window", [1000, 100], ids=["whole-raster-write-fails", "fails-only-when-closed"])
def test_a_mask_on_a_full_disk_is_one_line_and_the_previous_mask_is_kept(disk, window):
    """GDAL reports this only as log lines (the unaligned windows are flushed when the file is closed);
    the mask used to be published under its name anyway, empty or unreadable."""
    write_small_mask(disk / "mask.tif")
    data = noise(1000)
    with pytest.raises(OutputError) as error, atomic_raster(disk / "mask.tif", profile(1000)) as out:
        for row in range(0, 1000, window):
            for col in range(0, 1000, window):
                out.write(data[row:row + window, col:col + window], 1, window=Window(col, row, window, window))
    assert_one_line(error, str(disk / "mask.tif"), FULL, "free space there")
    assert leftovers(disk) == ["mask.tif"]
    with rasterio.open(disk / "mask.tif") as kept:
        assert kept.shape == (16, 16) and (kept.read(1) == 3).all()


def test_gdal_errors_alone_stop_the_publication(disk, monkeypatch):
    """Even if the read-back were fooled, the errors GDAL logs while closing the file are enough."""
    monkeypatch.setattr(writer, "verify_raster", lambda path, profile: None)
    data = noise(1000)
    with pytest.raises(OutputError) as error, atomic_raster(disk / "coverage.tif", profile(1000)) as out:
        for row in range(0, 1000, 100):
            out.write(data[row:row + 100], 1, window=Window(0, row, 1000, 100))
    assert_one_line(error, "coverage.tif", FULL)
    assert leftovers(disk) == []


def test_a_write_failure_of_another_kind_names_the_file_and_what_gdal_said(disk, monkeypatch):
    """A failing disk (EIO) or a network filesystem hiccup: no fix to suggest, but never a silent file."""
    monkeypatch.setattr(writer, "space_error", lambda *args, **kwargs: None)
    data = noise(1000)
    with pytest.raises(OutputError) as error, atomic_raster(disk / "mask.tif", profile(1000)) as out:
        for row in range(0, 1000, 100):
            out.write(data[row:row + 100], 1, window=Window(0, row, 1000, 100))
    message = assert_one_line(error, str(disk / "mask.tif"), "Write error", "nothing was published")
    assert len(message) < 500
    assert leftovers(disk) == []


def test_mask_and_coverage_written_together_publish_neither_on_a_full_disk(disk):
    """The annotate stage writes both at once, window by window."""
    data = noise(1000)
    with pytest.raises(OutputError) as error:
        with atomic_raster(disk / "mask.tif", profile(1000)) as mask, \
                atomic_raster(disk / "coverage.tif", profile(1000)) as coverage:
            for row in range(0, 1000, 100):
                mask.write(data[row:row + 100], 1, window=Window(0, row, 1000, 100))
                coverage.write(data[row:row + 100], 1, window=Window(0, row, 1000, 100))
    assert_one_line(error, FULL)
    assert leftovers(disk) == []


def test_a_read_only_output_folder_keeps_the_previous_raster_and_json(disk):
    write_small_mask(disk / "mask.tif")
    write_json(disk / "record.json", {"stage": "annotate"})
    read_only(disk)
    with pytest.raises(OutputError) as error, atomic_raster(disk / "mask.tif", profile(16)) as out:
        out.write(np.zeros((16, 16), np.uint8), 1)
    assert_one_line(error, str(disk / "mask.tif"), READ_ONLY, "make the folder writable")
    with pytest.raises(OutputError) as error:
        write_json(disk / "record.json", {"stage": "changed"})
    assert_one_line(error, str(disk / "record.json"), READ_ONLY)
    assert leftovers(disk) == ["mask.tif", "record.json"]
    assert json.loads((disk / "record.json").read_text()) == {"stage": "annotate"}


def test_json_on_a_full_disk_is_one_line_and_the_previous_file_is_untouched(disk):
    write_json(disk / "history.json", [{"epoch": 1}])
    fill(disk, leave=2048)
    with pytest.raises(OutputError) as error:
        write_json(disk / "history.json", [{"epoch": e, "note": "x" * 200} for e in range(100)])
    assert_one_line(error, str(disk / "history.json"), FULL)
    assert leftovers(disk) == ["history.json"]
    assert json.loads((disk / "history.json").read_text()) == [{"epoch": 1}]


def test_any_writer_that_fails_on_a_full_disk_is_told_so(disk):
    """torch.save reports a full disk as a RuntimeError of its own: the folder is probed, not guessed."""
    fill(disk, leave=4096)
    with pytest.raises(OutputError) as error, atomic_path(disk / "last.pt") as tmp:
        with tmp.open("wb") as handle:
            handle.write(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert_one_line(error, "last.pt", FULL)
    assert leftovers(disk) == []


def test_memory_maps_reserve_their_space_up_front(disk, big_disk):
    """The dataset stage used to die of SIGBUS (exit 135, no message) writing into a sparse memory map."""
    with pytest.raises(OutputError) as error:
        allocate_npy(disk / "train_images.npy", np.float16, (64, 8, 64, 64))
    assert_one_line(error, str(disk / "train_images.npy"), FULL, "(4.2 MB needed)")
    assert leftovers(disk) == []

    images = allocate_npy(big_disk / "train_images.npy", np.float16, (64, 8, 64, 64))
    masks = allocate_npy(big_disk / "train_masks.npy", np.uint8, (64, 64, 64))
    images[:] = np.arange(64, dtype=np.float16)[:, None, None, None]
    masks[-1] = 3
    images.flush()
    masks.flush()
    del images, masks
    images = np.load(big_disk / "train_images.npy", mmap_mode="r")
    masks = np.load(big_disk / "train_masks.npy", mmap_mode="r")
    assert images.shape == (64, 8, 64, 64) and images.dtype == np.float16 and images[63, 7, 63, 63] == 63
    assert masks.shape == (64, 64, 64) and (masks[-1] == 3).all() and not masks[:-1].any()
    assert os.stat(big_disk / "train_images.npy").st_blocks * 512 >= images.nbytes  # reserved, not sparse
    del images, masks


def test_previews_and_plots_on_a_full_disk_are_one_line_and_publish_nothing(disk):
    picture = np.random.default_rng(1).integers(0, 255, (3, 400, 400), dtype=np.uint8)
    with pytest.raises(OutputError) as error:
        write_png(disk / "preview.png", picture)
    assert_one_line(error, "preview.png", FULL)
    with pytest.raises(OutputError) as error:
        write_overlay_png(disk / "overlay.png", picture)
    assert_one_line(error, "overlay.png", FULL)
    fill(disk)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": 1e-3,
                "val_metrics": {"iou": {"snow": 0.5 + e / 20}}} for e in range(1, 6)]
    with pytest.raises(OutputError) as error:
        plots.plot_training_curves(history, disk)
    assert_one_line(error, "loss.png", FULL)
    assert leftovers(disk) == []


def test_a_folder_swap_on_a_read_only_mount_keeps_the_old_folder(disk):
    (disk / "dataset").mkdir()
    (disk / "dataset" / "manifest.json").write_text("{}")
    (disk / ".dataset.partial").mkdir()
    read_only(disk)
    with pytest.raises(OutputError) as error:
        swap_folder(disk / ".dataset.partial", disk / "dataset")
    assert_one_line(error, str(disk / "dataset"), READ_ONLY)
    assert (disk / "dataset" / "manifest.json").read_text() == "{}"


def test_a_folder_swap_that_fails_half_way_puts_the_old_folder_back(disk, tmp_path):
    """The new folder is on another filesystem (a job's scratch): the old one was moved aside already."""
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text("old")
    (disk / "new").mkdir()
    (disk / "new" / "manifest.json").write_text("new")
    with pytest.raises(OSError):
        swap_folder(disk / "new", tmp_path / "dataset")
    assert (tmp_path / "dataset" / "manifest.json").read_text() == "old"
    assert (disk / "new" / "manifest.json").read_text() == "new"
    assert not (tmp_path / ".dataset.old.tmp").exists()


def test_the_command_line_says_a_full_disk_in_one_line_with_exit_74(tmp_path):
    folder = tmp_path / "small"
    mount_tmpfs(folder, "256k")
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo-data", str(folder / "demo"),
                               "--scenes", "1", "--size", "240"], capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 74, done.stderr
        assert lines[-1].startswith("error: cannot write ") and FULL in lines[-1], done.stderr
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr
        for tif in (folder / "demo").rglob("*.tif"):
            if not any(part.startswith(".") for part in tif.relative_to(folder).parts):
                with rasterio.open(tif) as published:
                    published.read()
    finally:
        unmount(folder)


def test_a_folder_the_user_may_not_write_to_is_one_line(tmp_path):
    """As root nothing is forbidden, so the writer runs as `nobody` against a root-owned folder."""
    need_root("switching to another user")
    folder = Path(tempfile.mkdtemp(prefix="snowpipe-forbidden-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        (folder / "record.json").write_text('{"stage": "annotate"}\n')
        script = ("import os, sys; from pathlib import Path; from pipeline.data.writer import write_json\n"
                  "from pipeline.errors import OutputError\n"
                  "os.setgid(65534); os.setuid(65534)\n"
                  "try:\n"
                  f"    write_json(Path({str(folder / 'record.json')!r}), {{'stage': 'changed'}})\n"
                  "except OutputError as exc:\n"
                  "    print(exc); sys.exit(exc.exit_code)\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parent.parent)
        assert done.returncode == 74, done.stderr
        assert done.stdout.strip() == (f"cannot write {folder / 'record.json'}: permission denied; make the folder "
                                       f"writable for you or point the config's paths elsewhere")
        assert sorted(p.name for p in folder.iterdir()) == ["record.json"]
        assert (folder / "record.json").read_text() == '{"stage": "annotate"}\n'
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_a_per_scene_stage_with_74_naming_the_folder_and_tries_no_further_scene(tmp_path, workers):
    """The real annotate stage onto a full disk used to fail every scene in turn (exit 1, "the other scenes
    finished"), with libtiff's `_tiffSeekProc: No space left on device.` lines printed above the message."""
    import yaml

    from tests.builders import TILE, sid, write_auxiliary, write_scene

    size = 240
    dates = ["20220301T102309", "20220302T102309", "20220303T102309"]
    write_auxiliary(tmp_path, size)
    rng = np.random.default_rng(0)
    for date in dates:  # snow and background at random: a mask that does not compress to nothing
        write_scene(tmp_path, date, size, exolabs=rng.choice(np.array([4, 5], np.uint8), (size, size)))
    config = tmp_path / "pipeline-config.yml"
    config.write_text(yaml.safe_dump({
        "tile_id": TILE, "annotation": {"clouds": False, "workers": workers},
        "paths": {"extracted_data": ".", "annotated_masks": "masks", "dataset": "dataset", "results": "results"}}))
    masks = tmp_path / "masks"
    mount_tmpfs(masks, "64k")
    try:
        fill(masks, leave=4096)  # room for the locks and folders, not for a mask
        done = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config)],
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 74, done.stderr
        assert lines[-1].startswith(f"error: annotate stopped at scene {sid(dates[0]) if workers == 1 else ''}")
        assert f"cannot write {masks}" in lines[-1] and FULL in lines[-1] and "free space there" in lines[-1]
        assert ".partial-" not in lines[-1]  # the folder the user knows, not the private one already removed
        assert not [line for line in lines if "tiff" in line.lower() or "FAILED" in line], done.stderr
        assert "Traceback" not in done.stderr and "finished" not in done.stderr
        if workers == 1:
            assert "(2 other scene(s) not done)" in lines[-1]
            assert not [date for date in dates[1:] if date in done.stderr]  # never tried
        locks = {p.name: p.read_text() for p in masks.glob(".*.lock")}  # whose, when one is left
        assert leftovers(masks) == [], (done.stderr, locks)  # nothing published, no partial folder, no lock
    finally:
        unmount(masks)
