"""Damaged and odd inputs, as an unlucky user meets them: a band file damaged in place (same size), a decoded
raster damaged, a band that is a folder, a FIFO or a device, a product whose bands do not share one extent.

Every story runs the real `snowpipe stage` command on a copy of a small demo project (2 scenes of 120 px,
JPEG 2000 bands as real products have) and checks the exit code, the one line that names the file and its
fix, that nothing is written for the broken scene and that the other scene still runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
import torch
import yaml
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS, CLASS_NAMES
from pipeline.config import load_config
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.unet import ModelSpec, UNet
from pipeline.stages import annotate, decode
from tests.builders import sid

SIZE = 120
TILE = "32TNS"
DAMAGED_PRODUCT = "the file is damaged: re-extract the product zip or download it again"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Two demo scenes, annotated (for the dataset), and a tiny untrained model as results/training/best.pt."""
    root = tmp_path_factory.mktemp("damaged")
    config_path = write_demo_config(generate_demo(root, scenes=2, size=SIZE, seed=5))
    text = yaml.safe_load(config_path.read_text())
    text["annotation"].update(workers=1, clouds=False)  # s2cloudless is not what these stories are about
    text["inference"].update(device="cpu", quicklooks=False, window=64, halo=8)
    config_path.write_text(yaml.safe_dump(text, sort_keys=False))
    config = load_config(config_path)
    annotate.run(config)
    scene = discover_scenes(config.path("extracted_data"), TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(config.path("extracted_data"), TILE)) as reader:
        window = Window(0, 0, reader.grid.width, reader.grid.height)
        bands, valid = reader.read_bands(window)
        dem = reader.read_layer("dem", window)
    normaliser = Normaliser.fit(bands[:, valid], dem[valid])
    torch.manual_seed(0)
    model = UNet(ModelSpec(in_channels=len(BANDS) + 1, classes=len(CLASS_NAMES), base_channels=4, depth=2))
    best = config.path("results") / "training" / "best.pt"
    best.parent.mkdir(parents=True)
    save_checkpoint(best, {"spec": model.spec.to_dict(), "model": model.state_dict(), "channels": [*BANDS, "DEM"],
                           "classes": list(CLASS_NAMES), "normalisation": normaliser.to_dict(), "epoch": 1})
    return root


@pytest.fixture
def project(demo: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo, tmp_path / "project")
    return tmp_path / "project"


def snowpipe(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`snowpipe stage ...` on the project's config; a hang (a FIFO opened) fails the test instead of CI."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage", *args[:1],
                             str(project / "pipeline-config.yml"), *args[1:]],
                            capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return result


def scenes(project: Path):
    return discover_scenes(project / "extracted_data", TILE)


def band_file(project: Path, index: int, band: str) -> Path:
    date = scenes(project)[index].date
    return next((project / "extracted_data").glob(f"*.SAFE/GRANULE/*/IMG_DATA/*_{date}_{band}.jp2"))


def damage(path: Path) -> None:
    """Half of the file overwritten with random bytes: same size, the header intact."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size // 2)
        file.write(os.urandom(size - size // 2))
    assert path.stat().st_size == size


def line_with(text: str, *parts: str) -> str:
    """The one line of `text` that holds every part (the scene's message is one line)."""
    lines = [line for line in text.splitlines() if all(part in line for part in parts)]
    assert lines, f"no line with {parts} in:\n{text}"
    return lines[0]


def outputs(project: Path, stage: str, date: str) -> list[Path]:
    """What the stage wrote for a scene (for the dataset: anything at all)."""
    if stage == "decode":
        return list((project / "decoded").glob(f"*{date}*.SAFE/*.tif"))
    if stage == "annotate":
        return list((project / "annotated_masks" / sid(date)).glob("*.tif"))
    if stage == "dataset":
        return [*(project / "dataset").glob("*.npy"), *(project / "dataset").glob("manifest.json")]
    return list((project / "results" / "predictions" / sid(date)).glob("*.tif"))


# ---- a band damaged in place: every reader, one policy ----------------------------------------------------------

@pytest.mark.parametrize("stage", ["decode", "annotate", "dataset", "infer"])
def test_a_same_size_damaged_jpeg2000_band_fails_its_scene_in_every_stage_that_reads_it(project, stage):
    """Half of B08 overwritten with random bytes decodes to garbage with only OpenJPEG's warning "Stream does not
    end with EOC": SceneReader used to return 95 % changed pixels and no error (masks, patches, predictions of
    garbage). Annotate, dataset and infer read JPEG 2000 themselves with decoding off."""
    damaged, other = scenes(project)
    path = band_file(project, 0, "B08")
    damage(path)
    if stage == "annotate":
        shutil.rmtree(project / "annotated_masks")
    settings = [] if stage == "decode" else ["--set", "decode.enable=false"]
    if stage == "dataset":
        settings += ["--set", "annotation.enable=false"]  # the masks made before the damage are the user's own
    result = snowpipe(project, stage, *settings)

    assert result.returncode == 1, result.stderr
    line = line_with(result.stderr, damaged.date, str(path), DAMAGED_PRODUCT)
    assert "cannot decode" in line
    assert not outputs(project, stage, damaged.date), "nothing written for the damaged scene"
    if stage != "dataset":  # the dataset is one output of all scenes: none is written
        assert outputs(project, stage, other.date), "the other scene still ran"


def test_a_damaged_decoded_raster_stops_the_gpu_stage_is_decoded_again_by_a_cpu_stage_and_never_swapped_for_jpeg2000(
        project):
    """The decode stage's GeoTIFFs are vouched for by their content: damaged in place, they are never silently
    replaced by JPEG 2000. The GPU stage (infer) fails the scene naming the file and `decode --force` (a GPU job
    does only GPU work); a CPU stage that can decode (annotate) decodes the scene again and goes on. With
    `decode.enable: false` they are not read at all (the README's promise)."""
    config = load_config(project / "pipeline-config.yml")
    assert decode.run(config).count("done") == 2
    damaged = scenes(project)[0]
    decoded = decode.decoded_folder(config, damaged) / "B08.tif"
    good = decoded.read_bytes()
    damage(decoded)
    shutil.rmtree(project / "annotated_masks")

    result = snowpipe(project, "infer")
    assert result.returncode == 1, result.stderr
    line = line_with(result.stderr, damaged.date, str(decoded))
    assert "snowpipe stage decode" in line and "--force" in line and "re-extract" not in line
    assert not outputs(project, "infer", damaged.date) and outputs(project, "infer", scenes(project)[1].date)

    result = snowpipe(project, "annotate")
    assert result.returncode == 0, result.stderr
    assert "decoding the scene again" in line_with(result.stderr, damaged.date, str(decoded))
    assert decoded.read_bytes() == good  # decoded anew from the intact JPEG 2000 files
    assert all(outputs(project, "annotate", scene.date) for scene in scenes(project))

    damage(decoded)
    result = snowpipe(project, "annotate", "--force", "--set", "decode.enable=false")
    assert result.returncode == 0, result.stderr   # the JPEG 2000 bands are intact, the decoded ones not read
    assert "decoding the scene again" not in result.stderr
    off = config.model_copy(update={"decode": config.decode.model_copy(update={"enable": False})})
    assert not any(scene.decoded for scene in decode.discover_readable(off, []))


# ---- odd files -------------------------------------------------------------------------------------------------------

def make_odd(path: Path, kind: str) -> str:
    path.unlink()
    if kind == "folder":
        path.mkdir()
        return "is a folder"
    if kind == "fifo":
        os.mkfifo(path)  # opened, it blocked its reader for ever (and SIGTERM inside rasterio was swallowed)
        return "is a FIFO"
    path.symlink_to("/dev/zero")  # a device: creating a device node needs root, a link to one does not
    return "is a device"


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_band_that_is_a_folder_fifo_or_device_is_refused_by_name_and_the_other_scenes_run(project, kind):
    damaged, other = scenes(project)
    path = band_file(project, 0, "B03")
    said = make_odd(path, kind)
    shutil.rmtree(project / "annotated_masks")

    result = snowpipe(project, "annotate", timeout=120)
    assert result.returncode == 1, result.stderr  # a folder gave exit 70 and skipped the other scenes
    line_with(result.stderr, damaged.date, str(path), said, "re-extract")
    assert not outputs(project, "annotate", damaged.date)
    assert outputs(project, "annotate", other.date)


def test_a_fifo_band_is_refused_by_the_decode_stage_too(project):
    damaged, other = scenes(project)
    path = band_file(project, 0, "B8A")
    make_odd(path, "fifo")
    result = snowpipe(project, "decode", timeout=120)
    assert result.returncode == 1, result.stderr
    line_with(result.stderr, damaged.date, str(path), "is a FIFO")
    assert not outputs(project, "decode", damaged.date) and outputs(project, "decode", other.date)


# ---- bands that do not share one extent ----------------------------------------------------------------------------

def crop(path: Path, pixels: int) -> None:
    """Rewrite a JPEG 2000 band with its first `pixels` rows and columns (the corner kept)."""
    with rasterio.open(path) as source:
        profile, data = source.profile, source.read(1)
    profile.update(width=pixels, height=pixels, QUALITY="100", REVERSIBLE="YES")
    path.unlink()
    with rasterio.open(path, "w", **profile) as target:
        target.write(data[:pixels, :pixels], 1)


@pytest.mark.parametrize("stage", ["decode", "annotate"])
def test_a_product_whose_bands_do_not_share_one_extent_is_refused_naming_a_band(project, stage):
    """A cropped product: 10 m bands of 119 px beside 20 m bands of 59 px (1180 m against 1190 m). Decode used
    to pass it and annotate crashed on a numpy broadcast of (119, 119) with (118, 118), exit 70."""
    damaged, other = scenes(project)
    for band in BANDS:
        if BAND_RESOLUTION[band] == 10:
            crop(band_file(project, 0, band), SIZE - 1)
        elif BAND_RESOLUTION[band] == 20:
            crop(band_file(project, 0, band), SIZE // 2 - 1)
    shutil.rmtree(project / "annotated_masks")
    result = snowpipe(project, stage, *([] if stage == "decode" else ["--set", "decode.enable=false"]))

    assert result.returncode == 1, result.stderr
    line = line_with(result.stderr, damaged.date, "cropped", "B02")
    assert "_B05.jp2 covers" in line and "59 x 59 px of 20 m" in line  # the first 20 m band, by name
    assert not outputs(project, stage, damaged.date) and outputs(project, stage, other.date)
