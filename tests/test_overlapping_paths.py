"""Overlapping paths, met as an unlucky user meets them: a config whose folders overlap, so that one stage would
write or delete where another reads, is refused by `snowpipe validate`, `snowpipe run` and `snowpipe stage` with
one line per overlap (both keys, both folders, the fix) and exit code 2, before any file is touched. The layouts
snowpipe itself writes (the repository's config, the demo's, a cluster run's) stay valid. And what deletes
(decode.keep: until_used, the reclaiming of interrupted builds) only deletes what snowpipe made.

Demo scenes of 120 px (JPEG 2000 bands, as real products have); the stage table is pipeline/registry.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.data.layout import discover_scenes
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.records.publish import reclaim_partials
from pipeline.runner import run_stages
from pipeline.stages import annotate, decode
from pipeline.submit.plan import frozen_config
from tests.builders import make_config

ROOT = Path(__file__).resolve().parents[1]
SIZE = 120


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("overlap")
    write_demo_config(generate_demo(root, scenes=2, size=SIZE, seed=5))
    return root


@pytest.fixture
def project(demo: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo, so that a test that goes wrong cannot spoil the next one's data."""
    shutil.copytree(demo, tmp_path / "demo", symlinks=True)
    return tmp_path / "demo"


def configure(project: Path, **sections: dict) -> Path:
    """The demo's config with some keys changed (a section's keys merge into the demo's)."""
    path = project / "pipeline-config.yml"
    data = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        data[name] = {**(data.get(name) or {}), **values}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def files_under(folder: Path) -> dict[str, str]:
    """Every file under the folder (symlinks not followed) with a hash of its content: what a run must not lose."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


def unchanged(project: Path, before: dict[str, str]) -> bool:
    """No file added, removed or changed, but for the config the test edited."""
    def data(files: dict[str, str]) -> dict[str, str]:
        return {name: digest for name, digest in files.items() if name != "pipeline-config.yml"}

    return data(files_under(project)) == data(before)


def snowpipe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """The CLI in-process: its exit code and the lines of its error, which never holds a traceback."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line.strip() for line in err.splitlines() if line.strip()]


def refused(capsys: pytest.CaptureFixture[str], config: Path, *keys: str) -> str:
    """validate, run and stage all exit 2 with the same one line naming the keys; return that line."""
    lines = []
    for command in (["validate", str(config)], ["run", str(config)], ["stage", "annotate", str(config)]):
        code, err = snowpipe(capsys, *command)
        assert code == 2, (command, err)
        assert err[0] == f"error: {config} is invalid ({len(err) - 1} problem(s)):", err
        lines.append(err[1:])
    assert lines[0] == lines[1] == lines[2]
    (line,) = lines[0]  # one overlap, one line
    assert all(f"paths.{key}" in line for key in keys), line
    assert "give paths." in line and "a folder of its own" in line, line
    return line


# --- each overlap: refused, nothing touched -----------------------------------------------------------------------

def test_decoded_rasters_written_into_extracted_data_are_refused_and_no_band_is_deleted(project, capsys):
    """The reported loss: `decoded: extracted_data` with keep: until_used deleted every .jp2 of the products."""
    before = files_under(project)
    config = configure(project, paths={"decoded": "extracted_data"}, decode={"keep": "until_used"})
    line = refused(capsys, config, "decoded", "extracted_data")
    assert f"paths.extracted_data ({project / 'extracted_data'}) and paths.decoded " \
           f"({project / 'extracted_data'}) are the same folder" in line
    assert "paths.decoded is written by decode" in line
    assert line.endswith("give paths.decoded a folder of its own, outside paths.extracted_data and not containing it")
    assert unchanged(project, before)


def test_annotated_masks_inside_the_predictions_are_refused_and_the_labels_are_kept(project, capsys):
    """The reported loss: `annotated_masks: results/predictions` let infer overwrite the training labels (and the
    test stage then scored the predictions against themselves: IoU 1.000)."""
    labels = project / "results" / "predictions"
    for truth in sorted((project / "truth").glob("*.tif")):  # the user's own masks, one folder per scene
        (labels / truth.stem).mkdir(parents=True)
        shutil.copy(truth, labels / truth.stem / "mask.tif")
    before = files_under(project)
    config = configure(project, paths={"annotated_masks": "results/predictions"}, annotation={"enable": False})
    line = refused(capsys, config, "annotated_masks", "results/predictions")
    assert "paths.results/predictions is written by infer" in line
    assert line.endswith("give paths.annotated_masks a folder of its own, outside paths.results/predictions and "
                         "not containing it")
    assert unchanged(project, before)


@pytest.mark.parametrize(("paths", "count", "moved"), [
    ({"dataset": "annotated_masks"}, 1, "dataset"),              # the dataset's swap would drop the masks
    ({"annotated_masks": "results/training"}, 1, "annotated_masks"),
    ({"dataset": "results"}, 3, "dataset"),                      # around training/, predictions/, testing/
    ({"decoded": "."}, 6, "decoded"),                            # around every other folder
    ({"annotated_masks": "data"}, 0, "annotated_masks"),         # beside the data: fine
])
def test_every_other_overlap_is_refused_with_one_line_each(project, capsys, paths, count, moved):
    before = files_under(project)
    config = configure(project, paths=paths)
    code, err = snowpipe(capsys, "validate", str(config))
    if not count:
        assert code == 0, err
        return
    assert code == 2 and err[0] == f"error: {config} is invalid ({count} problem(s)):", err
    assert all(f"paths.{moved} " in line and f"give paths.{moved} a folder of its own" in line
               for line in err[1:]), err
    code, _ = snowpipe(capsys, "run", str(config))
    assert code == 2 and unchanged(project, before)


@pytest.mark.parametrize("key", ["decoded", "dataset"])
def test_an_overlap_through_a_symlink_is_caught(project, capsys, key):
    """`decoded: fast` where fast -> extracted_data looks harmless in the config; the resolved folder is not."""
    (project / "fast").symlink_to(project / "extracted_data" if key == "decoded" else project / "annotated_masks",
                                  target_is_directory=True)
    (project / "annotated_masks").mkdir(exist_ok=True)
    before = files_under(project / "extracted_data")
    config = configure(project, paths={key: "fast"})
    code, err = snowpipe(capsys, "validate", str(config))
    assert code == 2 and len(err) == 2, err
    target = "extracted_data" if key == "decoded" else "annotated_masks"
    assert f"paths.{key} ({project / 'fast'} -> {(project / target).resolve()})" in err[1], err
    assert f"paths.{target} ({project / target})" in err[1]
    assert files_under(project / "extracted_data") == before


def test_a_set_override_that_makes_an_overlap_is_refused_too(project, capsys):
    """Batch scripts point stages at node-local copies with --set: the result is checked like the file."""
    config = project / "pipeline-config.yml"
    code, err = snowpipe(capsys, "stage", "decode", str(config), "--set", "paths.decoded=extracted_data")
    assert code == 2 and err[0].startswith("error: the config with --set overrides is invalid"), err
    assert "paths.decoded" in err[1] and "paths.extracted_data" in err[1]


# --- the layouts snowpipe itself uses stay valid ------------------------------------------------------------------

def test_the_repository_config_and_the_demo_config_are_valid(project, tmp_path, capsys):
    shutil.copy(ROOT / "pipeline-config.yml", tmp_path / "pipeline-config.yml")
    assert load_config(tmp_path / "pipeline-config.yml").paths.decoded == "data/decoded"
    code, err = snowpipe(capsys, "validate", str(project / "pipeline-config.yml"))
    assert code == 0, err


def test_a_cluster_runs_layout_is_valid_with_the_dataset_inside_results(project):
    """On a cluster the dataset lies in runs/RUN/results/dataset, beside training/ and predictions/: train reads
    it, train, infer and test write their own folders of results, none around another."""
    config = load_config(project / "pipeline-config.yml")
    for data_root in ("/cluster/snowpipe/data", None):  # a cluster run; a local run (data where it is)
        frozen, paths = frozen_config(config, data_root, "/cluster/snowpipe/runs/r1")
        assert paths["dataset"] == "/cluster/snowpipe/runs/r1/results/dataset"
        job = parse_config(frozen, Path("/"), source="config.json")  # what a batch job reads
        assert job.path("dataset").parent == job.path("results")
    staged = parse_config({**frozen, "paths": {**paths, "dataset": "/tmp/job/dataset"}}, Path("/"))
    assert staged.path("dataset") == Path("/tmp/job/dataset")  # stage_inputs: train reads a node-local copy


def test_the_tests_layout_with_every_output_inside_extracted_data_is_valid(tmp_path):
    """A written folder inside one that is only read is harmless: readers look up their own names there."""
    config = make_config(tmp_path)
    assert config.path("extracted_data") == tmp_path and config.path("decoded").parent == tmp_path


# --- what deletes only deletes what snowpipe made -----------------------------------------------------------------

def test_until_used_deletes_only_the_band_files_decode_wrote_even_into_extracted_data(project):
    """The old failure, with the config check bypassed: decoding into the SAFE folders and deleting after use
    through the real stages keeps every JPEG 2000 file; only decode's own band files and record go."""
    config = load_config(project / "pipeline-config.yml")
    config = config.model_copy(update={
        "paths": config.paths.model_copy(update={"decoded": str(project / "extracted_data")}),
        "decode": config.decode.model_copy(update={"keep": "until_used"}),
        "annotation": config.annotation.model_copy(update={"clouds": False, "workers": 1}),
        **{name: getattr(config, name).model_copy(update={"enable": False})
           for name in ("dataset", "training", "inference", "testing")}})
    jp2 = {name: digest for name, digest in files_under(project / "extracted_data").items()}
    reports = run_stages(config, ["decode", "annotate"])
    assert not any(report.failed for report in reports)
    after = files_under(project / "extracted_data")
    assert {name: after.get(name) for name in jp2} == jp2  # every input file, with its content
    for scene in discover_scenes(config.path("extracted_data"), config.tiles):
        assert not list(scene.safe_dir.glob("*.tif")) and not (scene.safe_dir / ".snowpipe-complete.json").exists()


def test_release_keeps_files_decode_did_not_write_and_folders_without_its_record(project):
    config = load_config(configure(project, decode={"keep": "until_used"}, annotation={"clouds": False},
                                   dataset={"enable": False}, training={"enable": False},
                                   inference={"enable": False}, testing={"enable": False}))
    decode.run(config)
    first, second = decode.discover_readable(config, [])
    notes = decode.decoded_folder(config, first) / "notes.txt"
    notes.write_text("mine")
    annotate.run(config, dates=[first.date, second.date])
    assert notes.read_text() == "mine" and not list(notes.parent.glob("*.tif"))  # kept, and its folder
    assert not decode.decoded_folder(config, second).exists()  # nothing of anyone else's: the folder went

    foreign = decode.decoded_folder(config, second)  # a folder without decode's record is not decode's to delete
    foreign.mkdir()
    (foreign / "B01.tif").write_bytes(b"someone else's")
    decode.release_if_used(config, dataclasses.replace(second, decoded={"B01": foreign / "B01.tif"}))
    assert (foreign / "B01.tif").read_bytes() == b"someone else's"


def test_reclaim_removes_only_the_partial_folders_it_names(tmp_path):
    target = tmp_path / "20220301T102309"
    target.mkdir()
    ours = [tmp_path / f".{target.name}.partial-node-7.cluster-4242", tmp_path / f".{target.name}.partial-laptop-12"]
    theirs = [tmp_path / f".{target.name}.partial-notes", tmp_path / f".{target.name}.partial-laptop-12-backup",
              tmp_path / f".{target.name}x.partial-laptop-12"]
    for folder in [*ours, *theirs]:
        folder.mkdir()
        (folder / "mask.tif").write_bytes(b"x" * 100)
    assert reclaim_partials(target) > 0
    assert not any(folder.exists() for folder in ours)
    assert all((folder / "mask.tif").is_file() for folder in theirs)
    assert os.listdir(target) == []
