"""Plots: each function writes a real PNG picture of a sensible size, and tolerates gaps in its data."""

from __future__ import annotations

import matplotlib.image
import numpy as np

from pipeline import plots
from pipeline.bands import NODATA


def read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def assert_picture(path, min_side=200, max_side=4000):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = read_png(path)
    height, width = image.shape[:2]
    assert min_side <= height <= max_side and min_side <= width <= max_side
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def test_confusion_matrix_heat_map(tmp_path):
    matrix = np.array([[50, 2, 0, 1], [3, 40, 1, 0], [0, 5, 30, 0], [0, 0, 0, 0]])  # water absent: no 0/0
    assert_picture(plots.plot_confusion_matrix(matrix, tmp_path / "cm.png"))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_iou_per_scene_bars_with_an_absent_class(tmp_path):
    scenes = {"20220301T102309": {"background": 0.9, "snow": 0.8, "clouds": None, "water": 0.5, "mIoU": 0.73},
              "20220311T102309": {"background": 0.7, "snow": 0.6, "clouds": 0.4, "water": float("nan"),
                                  "mIoU": 0.57}}
    assert_picture(plots.plot_iou_per_scene(scenes, tmp_path / "iou.png"))


def test_difference_categories_and_map(tmp_path):
    predicted = np.array([[0, 1], [2, NODATA]], np.uint8)
    reference = np.array([[0, 2], [NODATA, 3]], np.uint8)
    categories = plots.difference_categories(predicted, reference)
    assert categories.tolist() == [[1, plots.DISAGREE], [plots.IGNORED, plots.IGNORED]]

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 4, (120, 90), dtype=np.uint8)
    predicted = np.where(rng.random((120, 90)) < 0.8, reference, (reference + 1) % 4).astype(np.uint8)
    predicted[:10] = NODATA
    image = assert_picture(plots.plot_difference_map(predicted, reference, tmp_path / "diff.png", title="scene"))
    assert image.shape[1] > image.shape[0]  # the legend sits beside the map


def test_training_curves_from_a_three_epoch_history(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.1, "lr": 1e-3,
         "val_metrics": {"iou": {"background": 0.5, "snow": 0.3, "clouds": 0.2, "water": 0.1}}},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "lr": 1e-3,
         "val_metrics": {"iou": {"background": 0.6, "snow": 0.5, "clouds": 0.3, "water": None}}},
        {"epoch": 3, "train_loss": 0.6, "val_loss": 0.7, "lr": 1e-4,
         "val_metrics": {"iou": {"background": 0.7, "snow": 0.6, "clouds": 0.4, "water": 0.3}}},
    ]
    written = plots.plot_training_curves(history, tmp_path / "training")
    assert written == [tmp_path / "training" / "loss.png", tmp_path / "training" / "iou.png"]
    for path in written:
        assert_picture(path)


def test_training_curves_tolerate_missing_keys_and_empty_history(tmp_path):
    assert plots.plot_training_curves([], tmp_path) == []
    written = plots.plot_training_curves([{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.7}], tmp_path)
    assert tmp_path / "loss.png" in written  # the loss curve exists without validation records
    for path in written:
        assert_picture(path)
