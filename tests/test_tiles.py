"""Several tiles in one config: scenes known by {TILE}_{YYYYMMDDTHHMMSS}, one discovery for every tile, the newest
processing baseline of a tile and time, and a one-tile project of the date-only layout carried over."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, records
from pipeline.data.layout import discover_scenes, superseded_notes
from pipeline.errors import DataError
from pipeline.stages import annotate, dataset
from tests.builders import TILE, make_config, sid, write_auxiliary, write_raster, write_scene

OTHER = "32TMS"
TIMES = ["20220301T102309", "20220311T102309"]  # one pass: both tiles share the sensing times


@pytest.fixture
def two_tiles(tmp_path: Path) -> Path:
    for tile in (TILE, OTHER):
        for time in TIMES:
            write_scene(tmp_path, time, tile=tile, exolabs=np.full((30, 30), 4, np.uint8))  # snow at 20 m
        write_auxiliary(tmp_path, tile=tile)
    return tmp_path


def annotate_only(root: Path, tiles: list[str], **sections: dict | list):
    return make_config(root, tiles=tiles, annotation={"clouds": False, "workers": 1},
                       **{"dataset": {"enable": False}, **sections})


def test_two_tiles_of_one_pass_are_four_scenes_with_their_own_folders(two_tiles):
    scenes = discover_scenes(two_tiles, [TILE, OTHER])
    assert [scene.id for scene in scenes] == [sid(t, OTHER) for t in TIMES] + [sid(t) for t in TIMES]
    config = annotate_only(two_tiles, [TILE, OTHER])
    report = annotate.run(config)
    assert report.count("done") == 4
    masks = config.path("annotated_masks")
    assert sorted(p.name for p in masks.iterdir() if not p.name.startswith(".")) == sorted(s.id for s in scenes)
    assert all(records.vouches(masks / scene.id) for scene in scenes)


def test_a_date_means_that_time_in_every_tile_and_a_scene_id_one_tile(two_tiles):
    scenes = discover_scenes(two_tiles, [TILE, OTHER], [TIMES[0], sid(TIMES[1], OTHER)])
    assert [s.id for s in scenes] == [sid(TIMES[0], OTHER), sid(TIMES[1], OTHER), sid(TIMES[0])]
    with pytest.raises(DataError, match=r"32TXX_20220301T102309 in the config match no scene"):
        discover_scenes(two_tiles, [TILE, OTHER], ["32TXX_20220301T102309"])


def test_adding_a_tile_redoes_no_scene_of_the_tiles_already_done(two_tiles):
    assert annotate.run(annotate_only(two_tiles, [TILE])).count("done") == 2
    both = annotate.run(annotate_only(two_tiles, [TILE, OTHER]))
    assert both.count("skipped") == 2 and both.count("done") == 2  # only the new tile's scenes are made


def test_the_newest_processing_baseline_of_a_tile_and_time_wins_and_is_said(tmp_path, capsys):
    write_scene(tmp_path, TIMES[0], baseline="0400")
    old = write_scene(tmp_path, TIMES[0], baseline="0301", mission="S2A")
    write_auxiliary(tmp_path)
    (scene,) = discover_scenes(tmp_path, [TILE])
    assert scene.baseline == "0400" and scene.superseded == (old,)
    assert superseded_notes([scene]) == [f"{sid(TIMES[0])}: {scene.safe_dir.name} (baseline 0400) chosen over "
                                         f"{old.name}: the newest processing baseline wins"]
    config = tmp_path / "pipeline-config.yml"
    config.write_text(f"tiles: [{TILE}]\npaths:\n  extracted_data: .\n")
    assert cli.main(["validate", str(config)]) == 0
    assert f"note: {superseded_notes([scene])[0]}" in capsys.readouterr().err


def test_validation_names_a_tile_without_products_or_without_auxiliary_data(two_tiles, capsys):
    config = two_tiles / "pipeline-config.yml"
    config.write_text(f"tiles: [{TILE}, 33TUM]\npaths:\n  extracted_data: .\n")
    assert cli.main(["validate", str(config)]) == 2
    assert "no Sentinel-2 L1C scenes of tile 33TUM" in capsys.readouterr().err
    for path in (two_tiles / f"{OTHER}_auxiliary_data").iterdir():
        path.unlink()
    (two_tiles / f"{OTHER}_auxiliary_data").rmdir()
    config.write_text(f"tiles: [{TILE}, {OTHER}]\npaths:\n  extracted_data: .\n")
    assert cli.main(["validate", str(config)]) == 2
    assert f"tile {OTHER}: no {OTHER}_auxiliary_data/ folder in {two_tiles}" in capsys.readouterr().err


def test_a_one_tile_project_of_the_date_only_layout_is_adopted_without_redoing_anything(two_tiles):
    """Masks snowpipe wrote before scene ids lie in annotated_masks/{date}/: renamed once, their record still
    valid, so nothing is redone; a second tile in the config would make a date ambiguous, so it is never read so."""
    config = annotate_only(two_tiles, [TILE])
    assert annotate.run(config).count("done") == 2
    masks = config.path("annotated_masks")
    for time in TIMES:
        os.rename(masks / sid(time), masks / time)  # as an older snowpipe left them
    before = (masks / TIMES[0] / "mask.tif").read_bytes()
    again = annotate.run(config)
    assert again.count("skipped") == 2, "the old masks are still this data's and config's"
    assert (masks / sid(TIMES[0]) / "mask.tif").read_bytes() == before and not (masks / TIMES[0]).exists()


def test_masks_made_by_hand_in_the_thesis_layout_are_read_where_they_are(tmp_path):
    """A folder without a completion record is the user's own: read in place for a one-tile config, never moved."""
    size = 64
    for time in TIMES:
        write_scene(tmp_path, time, size=size)
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 2:] = 1
        write_raster(tmp_path / "masks" / time / "mask.tif", mask, 10, nodata=255)
        write_raster(tmp_path / "masks" / time / "coverage.tif", np.ones((size, size), np.uint8), 10)
    config = make_config(tmp_path, annotation={"enable": False},
                         dataset={"patch_size": 32, "patches_per_scene": 4, "include_dem": False})
    report = dataset.run(config)
    assert report.count("done") == 2 and (tmp_path / "masks" / TIMES[0] / "mask.tif").is_file()
    assert not (tmp_path / "masks" / sid(TIMES[0])).exists()
