"""Records that vouch for content (issue 24): a finished output is known by its size and full content, an
input by its full content, so a file damaged in place with its size kept is found by the next run and by
`snowpipe verify`, and nothing built on it is called complete.

A demo project of 2 scenes, 160 px, copied per test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline import records
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.records import annotation, content
from pipeline.stages import annotate, decode

TILE = "32TNS"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    write_demo_config(generate_demo(root, scenes=2, size=160, seed=5))
    return root


@pytest.fixture
def project(demo: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo, tmp_path / "demo")
    return tmp_path / "demo"


def damage_in_place(path: Path, offset: int | None = None, length: int = 4096) -> None:
    """Overwrite bytes inside the file, its size kept (a bad sector, a half-finished copy, another program)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3 if offset is None else offset
    data[start:start + length] = bytes((b + 101) % 256 for b in data[start:start + length])
    path.write_bytes(bytes(data))


def said(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def config_of(root: Path):
    return load_config(root / "pipeline-config.yml")


def test_a_decoded_band_damaged_with_its_size_kept_is_found_named_and_decoded_again(project, capsys):
    config = config_of(project)
    assert decode.run(config).count("done") == 2
    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    band = decode.decoded_folder(config, scene) / "B08.tif"
    size = band.stat().st_size
    damage_in_place(band)
    assert band.stat().st_size == size

    assert main(["verify", str(project / "pipeline-config.yml")]) == 1
    out = said(capsys)
    assert f"{band}: its content changed since it was written" in out and "1 damaged, missing or out-of-date" in out
    # a GPU stage is told, naming the file; a CPU stage decodes the scene again; the decode stage redoes it too
    gpu = decode.with_decoded(config, [scene], redecode=False)[0]
    assert not gpu.decoded and str(band) in gpu.decoded_problem and "--force" in gpu.decoded_problem
    assert decode.with_decoded(config, [scene])[0].decoded
    assert "decoding the scene again" in said(capsys)
    assert main(["verify", str(project / "pipeline-config.yml")]) == 0
    damage_in_place(band)
    assert decode.run(config).count("done") == 1
    assert main(["verify", str(project / "pipeline-config.yml")]) == 0


def test_an_input_changed_in_place_with_its_size_kept_is_seen_by_every_stage(project, capsys):
    """Rows of a lakes raster redrawn in place (an uncompressed file: same size): the old identity read three
    64 KiB samples and missed such changes in a large file; the full content sees them anywhere."""
    config = config_of(project)
    lakes = find_auxiliary(config.path("extracted_data"), TILE).layers["lakes"]
    with rasterio.open(lakes) as source:
        profile, data = source.profile, source.read(1)
    profile.update(compress=None, tiled=False)
    with rasterio.open(lakes, "w", **profile) as target:
        target.write(data, 1)
    assert annotate.run(config).count("done") == 2
    size = lakes.stat().st_size
    with rasterio.open(lakes, "r+") as target:
        target.write(np.ones((20, data.shape[1]), data.dtype), 1, window=Window(0, 70, data.shape[1], 20))
    assert lakes.stat().st_size == size
    assert main(["verify", str(project / "pipeline-config.yml")]) == 1
    text = said(capsys)
    for scene in discover_scenes(config.path("extracted_data"), TILE):
        assert f"{config.path('annotated_masks') / scene.id}: out of date: its inputs changed" in text
    assert annotate.run(config).count("done") == 2  # both scenes read the lakes: both redone
    assert main(["verify", str(project / "pipeline-config.yml")]) == 0


def test_a_damaged_annotated_mask_is_not_trusted_by_the_dataset_and_annotate_redoes_it(project, capsys):
    config = config_of(project)
    assert annotate.run(config).count("done") == 2
    mask = config.path("annotated_masks") / discover_scenes(config.path("extracted_data"), TILE)[1].id / "mask.tif"
    damage_in_place(mask, length=512)
    key = annotation.record_key(discover_scenes(config.path("extracted_data"), TILE)[1], config,
                              find_auxiliary(config.path("extracted_data"), TILE))
    assert not records.is_complete(mask.parent, key)  # what the dataset stage asks before it takes the masks
    assert main(["verify", str(project / "pipeline-config.yml")]) == 1
    assert f"{mask}: its content changed" in said(capsys)
    assert annotate.run(config).count("done") == 1
    assert records.is_complete(mask.parent, key)


def test_verify_full_hashes_every_byte_where_the_stat_cannot_tell(project, capsys):
    """Bit rot changes no stat: the everyday check trusts the hash cache, `--full` reads every byte."""
    config = config_of(project)
    assert decode.run(config).count("done") == 2
    band = decode.decoded_folder(config, discover_scenes(config.path("extracted_data"), TILE)[0]) / "B02.tif"
    record = json.loads((band.parent / records.RECORD_NAME).read_text())
    sample = record["outputs"]["B02.tif"]["sample"]
    damage_in_place(band, offset=band.stat().st_size // 4, length=64)
    # what bit rot between the samples looks like: samples and stat as when the file was written
    assert records.sample_hash(band, band.stat().st_size) != sample
    record["outputs"]["B02.tif"]["sample"] = records.sample_hash(band, band.stat().st_size)
    (band.parent / records.RECORD_NAME).write_text(json.dumps(record))
    cache = content._cache_file(band.parent)
    entries = json.loads(cache.read_text())
    entries["B02.tif"][0] = content._stamp(band.stat())
    cache.write_text(json.dumps(entries))
    assert main(["verify", str(project / "pipeline-config.yml")]) == 0
    assert main(["verify", str(project / "pipeline-config.yml"), "--full"]) == 1
    assert f"{band}: its content changed" in said(capsys)


def test_a_record_of_the_previous_schema_is_upgraded_in_place_without_redoing(project):
    config = config_of(project)
    assert annotate.run(config).count("done") == 2
    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    folder = config.path("annotated_masks") / scene.id
    key = annotation.record_key(scene, config, find_auxiliary(config.path("extracted_data"), TILE))
    record = json.loads((folder / records.RECORD_NAME).read_text())
    old = {**record, "schema": 2, "inputs": key.sampled_inputs,
           "outputs": {name: entry["size"] for name, entry in record["outputs"].items()}}
    (folder / records.RECORD_NAME).write_text(json.dumps(old))
    assert annotate.run(config).count("skipped") == 2
    upgraded = json.loads((folder / records.RECORD_NAME).read_text())
    assert upgraded["schema"] == records.SCHEMA == 3 and upgraded["inputs"] == key.inputs
    assert upgraded["outputs"]["mask.tif"]["hash"] == content.full_hash(folder / "mask.tif")


def test_an_unchanged_input_is_hashed_once_then_known_by_its_stat(tmp_path, monkeypatch):
    path = tmp_path / "band.tif"
    path.write_bytes(os.urandom(300_000))
    monkeypatch.setenv("SNOWPIPE_CACHE", str(tmp_path / "cache"))
    hashed: list[Path] = []
    real = content.full_hash
    monkeypatch.setattr(content, "full_hash", lambda p: hashed.append(p) or real(p))
    first = content.content_hash(path)
    assert content.content_hash(path) == first and hashed == [path]
    damage_in_place(path, offset=150_000, length=10)
    assert content.content_hash(path) != first and hashed == [path, path]
