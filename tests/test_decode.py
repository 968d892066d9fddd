"""The decode stage: a scene's JPEG 2000 bands once into GeoTIFFs at native resolution, which every later stage
reads instead, with the same numbers; reused across runs, redone when a band file changes, never trusted half
written, and deleted after use when the config says so.

Demo scenes of 300 px (JPEG 2000 band files, as real products have).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.config import load_config
from pipeline.data.layout import discover_scenes
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.errors import SceneError
from pipeline.stages import annotate, decode

SIZE = 300
TILE = "32TNS"
# whole scene, a corner, an odd interior window, the far edges (where 20 / 60 m pixels overhang the grid)
WINDOWS = [Window(0, 0, SIZE, SIZE), Window(0, 0, 37, 53), Window(13, 7, 101, 77), Window(SIZE - 61, SIZE - 45, 61, 45)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decode")
    write_demo_config(generate_demo(root, scenes=2, size=SIZE, seed=3))
    return root


@pytest.fixture
def project(demo: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo (its own decoded folder), so that tests may change files."""
    shutil.copytree(demo, tmp_path / "demo")
    return tmp_path / "demo"


def config_of(root: Path, **sections):
    config = load_config(root / "pipeline-config.yml")
    return config.model_copy(update={k: getattr(config, k).model_copy(update=v) for k, v in sections.items()})


def test_decoded_bands_keep_their_native_grid_and_read_as_the_same_numbers_on_the_10m_grid(project):
    config = config_of(project)
    report = decode.run(config)
    assert report.count("done") == 2

    jp2 = discover_scenes(config.path("extracted_data"), TILE)
    decoded = decode.with_decoded(config, jp2)
    assert all(scene.decoded for scene in decoded)
    for before, after in zip(jp2, decoded):
        for band in BANDS:
            with rasterio.open(before.band_path(band)) as source, rasterio.open(after.read_path(band)) as copy:
                assert copy.res == source.res == (BAND_RESOLUTION[band],) * 2      # not resampled
                assert copy.transform == source.transform and copy.crs == source.crs
                assert copy.profile["compress"] == "zstd" and copy.profile["tiled"]
                assert np.array_equal(copy.read(1), source.read(1))
        with SceneReader(before, TILE) as old, SceneReader(after, TILE) as new:
            for window in WINDOWS:
                # 20 m and 60 m bands resampled to 10 m exactly as from JPEG 2000, no-data edges included
                assert np.array_equal(new.read_dn(window), old.read_dn(window)), window
                assert np.array_equal(new.read_valid(window), old.read_valid(window))
            coarse = Window(0, 0, SIZE // 2, SIZE // 2)
            old20, new20 = old.read_dn(coarse, factor=2), new.read_dn(coarse, factor=2)
            # the 20 m bands are read as they are; the 10 m ones averaged (JPEG 2000 gave its reduced level)
            for i, band in enumerate(BANDS):
                if BAND_RESOLUTION[band] == 20:
                    assert np.array_equal(new20[i], old20[i]), band
    # the record names the JPEG 2000 files by relative name: the project may move
    moved = project.parent / "moved"
    project.rename(moved)
    assert all(scene.decoded for scene in decode.with_decoded(config_of(moved), discover_scenes(
        moved / "extracted_data", TILE)))


def test_a_second_run_decodes_nothing_and_a_changed_band_file_is_decoded_again(project):
    config = config_of(project)
    decode.run(config)
    assert decode.run(config).count("skipped") == 2

    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    path = scene.band_path("B03")
    with rasterio.open(path) as source:
        profile, data = source.profile, source.read(1)
    with rasterio.open(path, "w", **profile) as out:  # the same product re-extracted with other content
        out.write(np.where(data > 0, data + 7, 0).astype(data.dtype), 1)
    with rasterio.open(path) as source:
        expected = source.read(1)
    assert not decode.with_decoded(config, [scene])[0].decoded   # not trusted: JPEG 2000 is read instead

    report = decode.run(config)
    assert [o.status for o in report.outcomes] == ["done", "skipped"]
    fresh = decode.with_decoded(config, [scene])[0]
    with rasterio.open(fresh.read_path("B03")) as copy:
        assert np.array_equal(copy.read(1), expected) and not np.array_equal(expected, data)


def test_a_corrupt_band_file_is_named_in_one_line_and_nothing_is_published(project):
    config = config_of(project)
    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    path = scene.band_path("B08")
    size = path.stat().st_size
    with open(path, "r+b") as damaged:  # the header survives, the code stream does not
        damaged.seek(size // 2)
        damaged.write(os.urandom(size - size // 2))
    with pytest.raises(SceneError, match=r"B08\.jp2") as caught:
        decode.decode_scene(scene, config)
    assert "\n" not in str(caught.value) and "re-extract" in str(caught.value)
    assert not decode.decoded_folder(config, scene).exists()
    assert not decode.with_decoded(config, [scene])[0].decoded


def test_a_decode_killed_between_two_strips_leaves_nothing_that_looks_complete(project):
    config = config_of(project)
    date = discover_scenes(config.path("extracted_data"), TILE)[0].date
    env = {**os.environ, "SNOWPIPE_KILL_AT": "decode strip written:5"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage", "decode", str(project / "pipeline-config.yml"),
                             "--scene", date], env=env, capture_output=True, text=True)
    assert result.returncode == -9
    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    assert not decode.with_decoded(config, [scene])[0].decoded
    assert not decode.decoded_folder(config, scene).exists()      # only a private partial folder was written

    report = decode.run(config, dates=[date])   # the rerun reclaims the partial folder and decodes the scene
    assert report.count("done") == 1
    assert not list(config.path("decoded").glob(".*partial*"))


def test_annotating_from_decoded_bands_writes_the_same_masks(project, tmp_path):
    config = config_of(project, annotation={"clouds": False})  # s2cloudless is covered by bench/annotate_speed.py
    annotate.run(config)
    masks = config.path("annotated_masks")
    before = {p.parent.name: rasterio.open(p).read(1) for p in masks.glob("*/mask.tif")}
    shutil.rmtree(masks)
    decode.run(config)
    annotate.run(config)
    for date, mask in before.items():
        assert np.array_equal(rasterio.open(masks / date / "mask.tif").read(1), mask), date


def test_until_used_deletes_a_scenes_decoded_bands_once_every_reader_has_finished_it(project):
    config = config_of(project, decode={"keep": "until_used"}, annotation={"clouds": False},
                       dataset={"enable": False}, training={"enable": False}, inference={"enable": False},
                       testing={"enable": False})
    decode.run(config)
    scenes = discover_scenes(config.path("extracted_data"), TILE)
    assert all(decode.decoded_folder(config, s).is_dir() for s in scenes)
    annotate.run(config, dates=[scenes[0].date])
    assert not decode.decoded_folder(config, scenes[0]).exists()      # annotate was its only reader
    assert decode.decoded_folder(config, scenes[1]).is_dir()          # not annotated yet: kept

    kept = config_of(project, annotation={"clouds": False})  # keep: always (the default)
    decode.run(kept)
    annotate.run(kept, dates=[scenes[0].date], force=True)
    assert decode.decoded_folder(kept, scenes[0]).is_dir()


def test_scancel_during_a_decode_exits_130_and_leaves_no_partial_folder(project):
    config = config_of(project)
    date = discover_scenes(config.path("extracted_data"), TILE)[0].date
    env = {**os.environ, "SNOWPIPE_KILL_AT": "decode strip written:3", "SNOWPIPE_KILL_SIGNAL": "TERM"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage", "decode", str(project / "pipeline-config.yml"),
                             "--scene", date], env=env, capture_output=True, text=True)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    decoded = config.path("decoded")
    assert not decoded.exists() or not [p for p in decoded.iterdir() if not p.name.endswith(".lock")]


def test_two_decodes_of_the_same_products_at_once_decode_each_scene_once(project):
    command = [sys.executable, "-m", "pipeline", "stage", "decode", str(project / "pipeline-config.yml")]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    text = "".join(outputs)
    assert text.count("13 bands decoded") == 2 and text.count("already complete (use --force") == 2
    config = config_of(project)
    assert all(s.decoded for s in decode.with_decoded(config, discover_scenes(config.path("extracted_data"), TILE)))


def test_a_full_disk_while_decoding_is_one_line_and_later_stages_read_jpeg_2000(project, tmp_path):
    from pipeline.errors import OutputError
    from tests.test_full_disk import mount_tmpfs, unmount

    disk = tmp_path / "small"
    mount_tmpfs(disk, "256k")
    try:
        config = config_of(project).model_copy(update={"paths": config_of(project).paths.model_copy(
            update={"decoded": str(disk)})})
        scene = discover_scenes(config.path("extracted_data"), TILE)[0]
        with pytest.raises(OutputError) as caught:
            decode.decode_scene(scene, config)
        assert "\n" not in str(caught.value) and str(disk) in str(caught.value)
        assert not decode.with_decoded(config, [scene])[0].decoded
        assert not [p for p in disk.rglob("*.tif")]  # nothing that looks complete, no partial left
    finally:
        unmount(disk)


def test_band_files_given_as_geotiff_decode_like_jpeg_2000(tmp_path):
    """What bench/infer_efficiency.py writes for full tiles on a GPU (JPEG 2000 takes minutes to encode)."""
    generate_demo(tmp_path, scenes=1, size=120, band_format="tif")
    config = load_config(write_demo_config(generate_demo(tmp_path / "jp2", scenes=1, size=120))).model_copy()
    config = config.model_copy(update={"paths": config.paths.model_copy(update={
        "extracted_data": str(tmp_path / "extracted_data"), "decoded": str(tmp_path / "decoded")})})
    assert decode.run(config).count("done") == 1
    scene = decode.discover_readable(config, [])[0]
    assert scene.band_path("B02").suffix == ".tif" and scene.decoded
