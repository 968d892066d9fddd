"""Infer: whole scenes predicted window by window onto the input grid, as the thesis did but faster.

One demo scene of 300 px (not a multiple of the windows used) and a tiny U-Net fitted to it for a few
steps, so that predictions follow the scene instead of being constant.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from bench.thesis_patch_blend import predict_patch_blend
from pipeline.bands import BANDS, CLASS_NAMES, NODATA
from pipeline.config import parse_config
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.errors import DataError
from pipeline.inference.predictor import Predictor
from pipeline.inference.source import array_input
from pipeline.inference.tiling import predict_windows, window_tiles
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.unet import ModelSpec, UNet
from pipeline.stages import infer
from tests.builders import sid

SIZE = 300
TILE = "32TNS"


@dataclass
class Demo:
    root: Path
    date: str
    checkpoint: Path
    normaliser: Normaliser
    model: UNet


def read_scene(root: Path, date: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    extracted = root / "extracted_data"
    scene = discover_scenes(extracted, TILE, [date])[0]
    with SceneReader(scene, TILE, find_auxiliary(extracted, TILE)) as reader:
        window = Window(0, 0, reader.grid.width, reader.grid.height)
        bands, valid = reader.read_bands(window)
        return bands, reader.read_layer("dem", window), valid


def fit_tiny_model(inputs: np.ndarray, truth: np.ndarray, steps: int = 40, crop: int = 64) -> UNet:
    """A few optimisation steps on random crops: enough for predictions that follow the scene."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNet(ModelSpec(in_channels=inputs.shape[0], classes=len(CLASS_NAMES), base_channels=4, depth=2))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        spots = rng.integers(0, inputs.shape[1] - crop, size=(4, 2))
        x = torch.from_numpy(np.stack([inputs[:, r:r + crop, c:c + crop] for r, c in spots]))
        y = torch.from_numpy(np.stack([truth[r:r + crop, c:c + crop] for r, c in spots]).astype(np.int64))
        optimiser.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=NODATA).backward()
        optimiser.step()
    return model.eval()


def write_checkpoint(path: Path, model: UNet, normaliser: Normaliser, channels: list[str]) -> Path:
    save_checkpoint(path, {"spec": model.spec.to_dict(), "model": model.state_dict(), "channels": channels,
                           "classes": list(CLASS_NAMES), "normalisation": normaliser.to_dict(), "epoch": 1})
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    root = tmp_path_factory.mktemp("infer-demo")
    date = generate_demo(root, scenes=1, size=SIZE, seed=3).dates[0]
    bands, dem, valid = read_scene(root, date)
    normaliser = Normaliser.fit(bands[:, valid], dem[valid])
    with rasterio.open(root / "truth" / f"{sid(date)}.tif") as src:
        truth = src.read(1)
    model = fit_tiny_model(normaliser.apply(bands, dem), truth)
    checkpoint = write_checkpoint(root / "model" / "tiny.pt", model, normaliser, [*BANDS, "DEM"])
    return Demo(root, date, checkpoint, normaliser, model)


def config_for(demo: Demo, out: Path, **inference):
    settings = {"enable": True, "checkpoint": str(demo.checkpoint), "window": 128, "halo": 32, "batch_size": 2,
                "device": "cpu", "quicklooks": False, **inference}
    data = {"tile_id": TILE, "paths": {"extracted_data": str(demo.root / "extracted_data"),
                                       "results": str(out / "results")},
            "dataset": {"include_dem": True}, "inference": settings}
    return parse_config(data, out)


def prediction(config, date: str, name: str = "mask.tif") -> Path:
    return config.path("results") / "predictions" / sid(date) / name


def test_every_pixel_of_a_scene_not_a_multiple_of_the_window_is_predicted_on_the_input_grid(demo, tmp_path):
    config = config_for(demo, tmp_path, window=128, halo=32)
    report = infer.run(config)
    assert report.count("done") == 1
    _, _, valid = read_scene(demo.root, demo.date)
    assert 0 < valid.mean() < 1, "the demo scene has a swath edge"
    band = next((demo.root / "extracted_data").glob("*.SAFE/GRANULE/*/IMG_DATA/*_B02.jp2"))
    with rasterio.open(prediction(config, demo.date)) as out, rasterio.open(band) as b02:
        assert (out.crs, out.transform, out.shape) == (b02.crs, b02.transform, b02.shape)
        assert out.nodata == NODATA and out.dtypes[0] == "uint8" and out.profile["tiled"]
        assert out.compression is not None
        mask = out.read(1)
    assert np.array_equal(mask == NODATA, ~valid), "255 exactly outside coverage"
    assert set(np.unique(mask[valid])) <= {0, 1, 2, 3}
    assert len(np.unique(mask[valid])) >= 2, "the fitted model predicts more than one class"
    # The corners and the last, narrower windows are predicted like any other pixel.
    for rows, cols in [(slice(0, 8), slice(0, 8)), (slice(-44, None), slice(None)), (slice(None), slice(-44, None))]:
        assert (mask[rows, cols][valid[rows, cols]] != NODATA).all()


def test_decoding_once_predicts_what_decoding_every_window_predicts(demo, tmp_path):
    masks = []
    for decode_once in (True, False):
        config = config_for(demo, tmp_path / str(decode_once), window=128, halo=32, decode_once=decode_once)
        assert infer.run(config).count("done") == 1
        with rasterio.open(prediction(config, demo.date)) as out:
            masks.append(out.read(1))
    # The two paths may differ by 1 DN on a few resampled pixels (see test_decoded.py): near-identical masks.
    assert (masks[0] != masks[1]).mean() < 0.001
    assert np.array_equal(masks[0] == NODATA, masks[1] == NODATA)


def iou(a: np.ndarray, b: np.ndarray, classes: int = len(CLASS_NAMES)) -> float:
    """Mean IoU over the classes either mask uses."""
    scores = [((a == c) & (b == c)).sum() / ((a == c) | (b == c)).sum() for c in range(classes)
              if ((a == c) | (b == c)).any()]
    return float(np.mean(scores))


def test_large_windows_agree_with_the_thesis_patch_blend(demo):
    bands, dem, valid = read_scene(demo.root, demo.date)
    source = array_input(demo.normaliser.apply(bands, dem), valid)
    predictor = Predictor(demo.model, torch.device("cpu"))
    windowed = np.full((SIZE, SIZE), NODATA, np.uint8)
    for result in predict_windows(source, SIZE, SIZE, predictor, window=128, halo=32, batch_size=2):
        rows, cols = result.core.toslices()
        windowed[rows, cols] = result.classes
    blended, blend_valid = predict_patch_blend(source, SIZE, SIZE, predictor, patch=256, stride=128, batch_size=4)
    assert np.array_equal(blend_valid, valid)
    patches = blended.argmax(axis=0)
    assert len(np.unique(windowed[valid])) >= 2, "not a constant prediction"
    assert iou(windowed[valid], patches[valid]) >= 0.98, iou(windowed[valid], patches[valid])


def test_reads_stay_window_sized_whatever_the_scene(demo):
    """Memory follows the window: no read is larger than a window and its halo on both sides."""
    bands, dem, valid = read_scene(demo.root, demo.date)
    inputs = demo.normaliser.apply(bands, dem)
    seen: list[tuple[int, int]] = []
    source = array_input(inputs, valid)

    def spying():
        context = source()
        read = context.__enter__()

        class Spy:
            def __enter__(self):
                def wrapped(window):
                    seen.append((int(window.height), int(window.width)))
                    return read(window)
                return wrapped

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Spy()

    predictor = Predictor(demo.model, torch.device("cpu"))
    covered = np.zeros((SIZE, SIZE), np.int32)
    for result in predict_windows(spying, SIZE, SIZE, predictor, window=64, halo=16, batch_size=3):
        rows, cols = result.core.toslices()
        covered[rows, cols] += 1
    assert (covered == 1).all(), "every pixel predicted exactly once"
    assert max(h for h, _ in seen) <= 64 + 2 * 16 and max(w for _, w in seen) <= 64 + 2 * 16


def test_flip_tta_and_probabilities(demo, tmp_path):
    config = config_for(demo, tmp_path, tta=True, save_probabilities=True, window=256, halo=16)
    infer.run(config)
    _, _, valid = read_scene(demo.root, demo.date)
    with rasterio.open(prediction(config, demo.date)) as m, \
            rasterio.open(prediction(config, demo.date, "probabilities.tif")) as p:
        mask, probs = m.read(1), p.read()
        assert p.count == len(CLASS_NAMES) and p.dtypes[0] == "uint8" and p.transform == m.transform
    assert np.array_equal(mask == NODATA, ~valid)
    total = probs.astype(int).sum(axis=0)
    assert (np.abs(total[valid] - 255) <= 4).all(), "probabilities x 255 sum to 255"
    # Rounding to uint8 may swap near-ties, nothing else.
    assert (probs.argmax(axis=0)[valid] == mask[valid]).mean() > 0.99


def test_checkpoint_for_other_channels_is_refused_naming_both(demo, tmp_path):
    bands_only = Normaliser(demo.normaliser.low, demo.normaliser.high, demo.normaliser.mean)
    model = UNet(ModelSpec(in_channels=len(BANDS), classes=len(CLASS_NAMES), base_channels=4, depth=2))
    path = write_checkpoint(tmp_path / "bands-only.pt", model, bands_only, list(BANDS))
    config = config_for(demo, tmp_path, checkpoint=str(path))
    with pytest.raises(DataError) as error:
        infer.run(config)
    message = str(error.value)
    assert "13 input channels" in message and "14" in message and "DEM" in message and str(path) in message
    assert not (config.path("results") / "predictions").exists()


def test_missing_checkpoint_says_to_train_first(demo, tmp_path):
    config = config_for(demo, tmp_path, checkpoint="best")
    with pytest.raises(DataError, match=r"training/best.pt not found: run the train stage first"):
        infer.run(config)


def test_finished_scenes_are_skipped_until_forced_or_changed(demo, tmp_path):
    config = config_for(demo, tmp_path)
    assert infer.run(config).count("done") == 1
    record = json.loads((prediction(config, demo.date).parent / ".snowpipe-complete.json").read_text())
    assert record["stage"] == "infer" and len(record["class_fraction"]) == len(CLASS_NAMES)
    assert infer.run(config).count("skipped") == 1
    assert infer.run(config, force=True).count("done") == 1
    assert infer.run(config_for(demo, tmp_path, halo=16)).count("done") == 1, "another setting redoes it"
    assert infer.run(config_for(demo, tmp_path, halo=16), dates=[demo.date]).count("skipped") == 1


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # a PNG is a picture
def test_quicklooks_are_pictures_of_the_scene(demo, tmp_path):
    config = config_for(demo, tmp_path, quicklooks=True)
    infer.run(config)
    folder = prediction(config, demo.date).parent
    for name in ("true_colour", "false_colour"):
        with rasterio.open(folder / f"{name}.tif") as tif:
            assert tif.count == 3 and tif.crs.to_epsg() == 32632 and (tif.width, tif.height) == (SIZE, SIZE)
        with rasterio.open(folder / f"{name}.png") as png:
            assert png.driver == "PNG" and (png.count, png.width, png.height) == (3, SIZE, SIZE)
    with rasterio.open(folder / "overlay.png") as png:
        assert png.driver == "PNG" and png.width == SIZE and png.height > SIZE, "legend strip below"
    assert not list(folder.glob(".*.tmp"))


def test_a_failing_read_surfaces_as_the_error_it_is(demo):
    """An unreadable window stops the scene with its own message; the reading threads do not hang."""
    from pipeline.errors import SceneError
    from pipeline.inference.readahead import read_ahead

    @contextmanager
    def broken():
        def read(window):
            raise SceneError(demo.date, "cannot read B02.jp2: truncated file")
        yield read

    with pytest.raises(SceneError, match="truncated file"):
        list(read_ahead(broken, [Window(0, 0, 8, 8)] * 5, readers=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("infer-reader")]


def test_by_default_a_full_tile_is_predicted_in_16_windows_of_at_most_4_shapes():
    from pipeline.inference.tiling import window_for

    window = window_for(0, 10980, 10980, 64)
    tiles = window_tiles(10980, 10980, window, 64)
    shapes = {(int(t.padded.height), int(t.padded.width)) for t in tiles}
    computed = sum(int(t.padded.height) * int(t.padded.width) for t in tiles)
    assert window == 2745 and len(tiles) == 16 and len(shapes) == 4
    assert 10980**2 / computed > 0.92          # 1024 px windows with the same halo: 0.80
    assert window_for(0, 480, 480, 64) == 1024  # a small scene: one window
    assert window_for(512, 10980, 10980, 64) == 512


def test_predictions_are_written_behind_in_order_and_a_write_error_reaches_the_caller():
    from pipeline.inference.write_behind import write_behind

    written: list[int] = []
    write_behind(iter(range(50)), written.append, depth=3)
    assert written == list(range(50))

    produced: list[int] = []

    def windows():
        for i in range(1000):
            produced.append(i)
            yield i

    def full_disk(i: int) -> None:
        if i == 5:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_behind(windows(), full_disk, depth=2)
    assert len(produced) < 20  # the predictions stop soon after the failed write


@pytest.mark.parametrize("decode_once", [False, True], ids=["jpeg2000-per-window", "decoded-once"])
def test_a_failed_write_leaves_no_thread_behind(demo, tmp_path, monkeypatch, decode_once):
    """The window generator was never closed: its reading threads outlived a failed mask write (and kept
    reading the scene) for as long as anything held the error. The decoding lanes and the quicklooks' thread
    end too."""
    import errno

    def failing_disk(mask_out, result):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(infer, "_write_window", failing_disk)
    config = config_for(demo, tmp_path, window=64, halo=16, batch_size=1, decode_once=decode_once,
                        quicklooks=True)  # 25 windows, two waiting at most
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="Input/output error"):
        infer.run(config)
    # still inside the error's lifetime (pytest holds its traceback, as the CLI does while it reports it)
    assert [t.name for t in threading.enumerate() if t not in before] == []
    folder = prediction(config, demo.date).parent
    assert not folder.exists() and not list(folder.parent.glob(".*.partial-*"))
