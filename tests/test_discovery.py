"""Scene discovery that grows with the scenes: each folder listed once, the same scenes as one glob per scene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import cli
from pipeline import config as config_module
from pipeline.bands import BANDS
from pipeline.config import checked_scenes, load_config
from pipeline.data import layout
from pipeline.data.layout import EXOLABS_FOLDER, discover_scenes, exolabs_by_day, find_exolabs
from pipeline.errors import DataError
from pipeline.submit import plan
from tests.builders import TILE, make_config

DATES = ["20220105T102309", "20220110T102309", "20220115T102309", "20220120T102309"]
EXOLABS = [  # several a day, other tiles, other endings, a folder, too short to hold a day; 01-15 has none
    "S2_32TNS_2022-01-05_b.tif", "S2_32TNS_2022-01-05_a.tif", "S2_32TNS_2022-01-05.tif", "S2_32TMS_2022-01-05_a.tif",
    "S2_32TNS_2022-01-10_classification.tif", "S2_32TNS_2022-01-10_classification.TIF",
    "S2_32TNS_2022-01-10.tif.aux.xml", "S2_32TMS_2022-01-10_classification.tif", "S2_32TNS_2022-01-1.tif",
    "S2_32TNS_.tif", "s2_32TNS_2022-01-20_x.tif", "S2_32TNS_2022-01-21_x.tif", "S2_32TNS_2022-01-200.tif",
]


def empty_scene(root: Path, date: str, tile: str = TILE) -> None:
    """A SAFE folder with empty band files: discovery reads names and file types only."""
    img = root / f"S2A_MSIL1C_{date}_N0400_R022_T{tile}_{date[:8]}T150000.SAFE" / "GRANULE" / "L1C_X" / "IMG_DATA"
    img.mkdir(parents=True)
    for band in BANDS:
        (img / f"T{tile}_{date}_{band}.jp2").touch()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for date in DATES:
        empty_scene(tmp_path, date)
    empty_scene(tmp_path, DATES[0], tile="32TMS")
    exolabs = tmp_path / EXOLABS_FOLDER
    exolabs.mkdir()
    for name in EXOLABS:
        (exolabs / name).touch()
    (exolabs / "S2_32TNS_2022-01-20_folder.tif").mkdir()  # the glob matches a folder too: so does the index
    (exolabs / "S2_32TNS_2022-01-25_folder.tif").mkdir()
    return tmp_path


def test_one_listing_finds_what_a_glob_per_scene_found(tree):
    scenes = discover_scenes(tree, TILE)
    assert [scene.date for scene in scenes] == DATES
    assert [scene.exolabs for scene in scenes] == [find_exolabs(tree, TILE, scene.day) for scene in scenes]
    folder = tree / EXOLABS_FOLDER
    assert [scene.exolabs for scene in scenes] == [folder / "S2_32TNS_2022-01-05.tif",
                                                   folder / "S2_32TNS_2022-01-10_classification.tif", None,
                                                   folder / "S2_32TNS_2022-01-200.tif"]  # '0' before '_'
    days = {name[9:19] for name in EXOLABS} | {"2022-01-15", "2022-01-25", "2022-01-26"}
    index = exolabs_by_day(tree, [TILE, "32TMS"])  # every tile from the one listing
    assert {day: index.get((TILE, day)) for day in days} == {day: find_exolabs(tree, TILE, day) for day in days}
    assert {key: path for key, path in index.items() if key[0] == "32TMS"} == {
        ("32TMS", "2022-01-05"): folder / "S2_32TMS_2022-01-05_a.tif",
        ("32TMS", "2022-01-10"): folder / "S2_32TMS_2022-01-10_classification.tif"}


def test_no_exolabs_folder_means_no_exolabs(tree):
    os.rename(tree / EXOLABS_FOLDER, tree / "elsewhere")
    assert [scene.exolabs for scene in discover_scenes(tree, TILE)] == [None] * len(DATES)
    assert exolabs_by_day(tree, [TILE]) == {}


def test_the_exolabs_folder_is_listed_once_per_discovery(tree, monkeypatch):
    listed: list[str] = []
    scandir = os.scandir

    def counting(path):
        listed.append(os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(layout.os, "scandir", counting)
    discover_scenes(tree, TILE)
    assert listed.count(str(tree / EXOLABS_FOLDER)) == 1


def counted(monkeypatch, module) -> list[tuple]:
    calls: list[tuple] = []
    real = module.discover_scenes

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, "discover_scenes", counting)
    return calls


def test_the_planner_discovers_once_for_every_date_list(tree, monkeypatch):
    calls = counted(monkeypatch, plan)
    scan = plan.scene_scanner(make_config(tree))
    assert [s.date for s in scan([])] == DATES
    assert [s.date for s in scan([DATES[2], DATES[0]])] == [DATES[0], DATES[2]]  # sorted, as discover_scenes
    assert scan([DATES[1]]) == discover_scenes(tree, TILE, [DATES[1]])
    with pytest.raises(DataError, match="20990101T000000 in the config match no scene"):
        scan(["20990101T000000"])
    assert len(calls) == 1


def test_validate_discovers_once_and_counts_the_dates(tree, monkeypatch, capsys):
    calls = counted(monkeypatch, config_module)
    path = tree / "pipeline-config.yml"
    path.write_text(f"tile_id: {TILE}\ndates: [{DATES[0]}, {DATES[3]}]\npaths:\n  extracted_data: .\n"
                    "annotation:\n  enable: false\ndataset:\n  enable: false\ntraining:\n  enable: false\n"
                    "inference:\n  enable: false\ntesting:\n  enable: false\n")
    assert cli.main(["validate", str(path)]) == 0
    assert ", 2 scene(s)" in capsys.readouterr().out
    assert len(calls) == 1
    scenes, problems = checked_scenes(load_config(path), ["annotate"])
    assert [s.date for s in scenes] == DATES
    assert problems == [f"tile {TILE}: no {TILE}_auxiliary_data/ folder in {tree} (the lakes and surface water "
                        f"layers annotation reads); add it or drop the tile from `tiles`"]
    (tree / f"{TILE}_auxiliary_data").mkdir()
    assert checked_scenes(load_config(path), ["annotate"])[1] == []
