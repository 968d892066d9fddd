"""`decode.keep: until_used` frees a scene's decoded rasters only when every stage that reads them has its
complete output for the current config and no other process still reads them: two runs, one freeing while the
other reads, never pull files from under the reader; a freed scene is read from JPEG 2000 with a note, and a
rerun does not decode what it would free at once.

A demo project of 2 scenes, 160 px; annotate is the only stage that reads the bands."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import records
from pipeline.config import load_config
from pipeline.data.layout import discover_scenes
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.records.readers import readers_folder
from pipeline.stages import decode

READER = """
import sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.stages import decode
scenes = decode.discover_readable(load_config(sys.argv[1]), [])
assert all(scene.decoded for scene in scenes)
Path(sys.argv[2]).write_text("reading")
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("space")
    write_demo_config(generate_demo(root, scenes=2, size=160, seed=9))
    config = yaml.safe_load((root / "pipeline-config.yml").read_text())
    config["decode"] = {**config.get("decode", {}), "keep": "until_used"}
    for section in ("dataset", "training", "inference", "testing"):
        config[section] = {**config.get(section, {}), "enable": False}
    (root / "pipeline-config.yml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture
def project(demo: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo, tmp_path / "demo")
    return tmp_path / "demo"


def snowpipe(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args[:2], str(project / "pipeline-config.yml"),
                             *args[2:]], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return result


def wait_for(path: Path, process: subprocess.Popen) -> None:
    while not path.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)


def folders(project: Path) -> list[Path]:
    config = load_config(project / "pipeline-config.yml")
    return [decode.decoded_folder(config, scene) for scene in discover_scenes(config.path("extracted_data"), "32TNS")]


def test_rasters_another_run_reads_are_kept_until_it_ends_then_freed_and_never_decoded_again(project, tmp_path):
    assert snowpipe(project, "stage", "decode").returncode == 0
    reading, done = tmp_path / "reading", tmp_path / "done"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(project / "pipeline-config.yml"), str(reading),
                               str(done)], stderr=subprocess.PIPE, text=True)
    wait_for(reading, reader)  # another run has taken both scenes' decoded rasters

    result = snowpipe(project, "stage", "annotate")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("decoded rasters kept for now") == 2 and "freed" not in result.stderr
    assert all((folder / records.RECORD_NAME).is_file() for folder in folders(project))

    done.write_text("done")
    assert reader.wait(timeout=300) == 0, reader.communicate()
    assert not any(readers_folder(folder).exists() for folder in folders(project))  # it unregistered at exit
    result = snowpipe(project, "stage", "annotate")  # finished work: skipped, and now nobody reads: freed
    assert "annotate: 0 done, 2 already complete" in result.stderr and result.stderr.count("freed") == 2
    assert not any(folder.exists() for folder in folders(project))

    result = snowpipe(project, "stage", "decode")  # every reader finished: nothing to decode again
    assert result.returncode == 0 and "decode: 0 done, 2 already complete" in result.stderr, result.stderr
    assert not any(folder.exists() for folder in folders(project))
    result = snowpipe(project, "stage", "annotate", "--force")  # a reader of a freed scene: JPEG 2000, said
    assert result.returncode == 0 and result.stderr.count("reading the JPEG 2000 files") == 2, result.stderr


def test_a_reader_that_died_does_not_keep_the_rasters(project):
    assert snowpipe(project, "stage", "decode").returncode == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for folder in folders(project):
        marks = readers_folder(folder)
        marks.mkdir()
        (marks / f"{__import__('socket').gethostname()}-{dead.stdout.strip()}-1").touch()  # killed mid-read
    result = snowpipe(project, "stage", "annotate")
    assert result.returncode == 0 and result.stderr.count("freed") == 2, result.stderr


def test_masks_of_other_settings_do_not_free_the_rasters(project):
    """A finished annotation of another config is not the current one: the rasters stay for the rerun."""
    assert snowpipe(project, "stage", "annotate", "--set", "annotation.clouds=false").returncode == 0
    assert not any(folder.exists() for folder in folders(project))  # that config's run freed them
    assert snowpipe(project, "stage", "decode").returncode == 0     # the current config's masks are not there
    assert all((folder / records.RECORD_NAME).is_file() for folder in folders(project))
