"""Test stage: metrics with known answers, ignored pixels that never count, both references, outputs, reruns."""

from __future__ import annotations

import csv
import json
import os

import matplotlib.image
import numpy as np
import pytest

from pipeline import records
from pipeline.bands import CLASS_NAMES, NODATA
from pipeline.metrics import confusion_matrix
from pipeline.registry import stage_dates
from pipeline.stages import test as test_stage
from pipeline.stages.base import StageFailed
from tests.builders import make_config, sid, write_raster, write_scene

SIZE = 60
DATE_A, DATE_B = "20220301T102309", "20220311T102309"
N = NODATA


def scores_of(predicted, reference):
    matrix = confusion_matrix(np.asarray(predicted, np.uint8), np.asarray(reference, np.uint8))
    return test_stage.summarise(matrix, total_pixels=np.asarray(predicted).size)


def test_hand_computed_4x4_with_ignored_pixels():
    reference = [[0, 0, 1, 1],
                 [0, 0, 1, 1],
                 [2, 2, 3, N],
                 [0, 1, 2, 3]]
    predicted = [[0, 1, 1, 1],
                 [0, 0, 1, 0],
                 [2, 3, 3, 0],
                 [N, 1, 2, 3]]
    s = scores_of(predicted, reference)
    # Rows reference, columns prediction; the two 255 pixels are left out, 14 are compared.
    assert s["confusion_matrix"] == [[3, 1, 0, 0], [1, 4, 0, 0], [0, 0, 2, 1], [0, 0, 0, 2]]
    assert s["pixels"] == {"total": 16, "compared": 14, "ignored": 2}
    c = s["classes"]
    assert c["background"] == pytest.approx(
        {"iou": 3 / 5, "dice": 6 / 8, "precision": 3 / 4, "recall": 3 / 4, "pixels": 4, "predicted_pixels": 4})
    assert c["snow"] == pytest.approx(
        {"iou": 4 / 6, "dice": 8 / 10, "precision": 4 / 5, "recall": 4 / 5, "pixels": 5, "predicted_pixels": 5})
    assert c["clouds"] == pytest.approx(
        {"iou": 2 / 3, "dice": 4 / 5, "precision": 1.0, "recall": 2 / 3, "pixels": 3, "predicted_pixels": 2})
    assert c["water"] == pytest.approx(
        {"iou": 2 / 3, "dice": 4 / 5, "precision": 2 / 3, "recall": 1.0, "pixels": 2, "predicted_pixels": 3})
    assert s["miou"] == pytest.approx((3 / 5 + 3 * 2 / 3) / 4)
    assert s["pixel_accuracy"] == pytest.approx(11 / 14)


def test_outside_coverage_is_not_background_agreement():
    """The thesis zeroed ignored pixels in both masks, so they became background hits; here they vanish."""
    reference = [[0, 0, N, N],
                 [1, 1, 0, 0]]
    predicted = [[N, N, 0, 0],
                 [1, 1, 1, 0]]
    s = scores_of(predicted, reference)
    assert s["pixels"]["compared"] == 4
    assert s["classes"]["background"]["iou"] == pytest.approx(1 / 2)  # thesis: 5 / 6
    assert s["classes"]["background"]["pixels"] == 2


def test_miou_averages_only_classes_present_and_absent_scores_are_null():
    s = scores_of([[0, 1, 1, 1]], [[0, 1, 1, 0]])
    assert s["classes"]["clouds"]["iou"] is None and s["classes"]["water"]["dice"] is None
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    nothing = scores_of([[N, N]], [[0, 1]])
    assert nothing["miou"] is None and nothing["pixels"]["compared"] == 0
    json.dumps(nothing, allow_nan=False)  # valid JSON: no NaN anywhere


def test_exolabs_codes_map_to_classes_glacier_ice_is_snow_and_unobserved_is_ignored():
    codes = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 255], np.uint8)
    assert test_stage.exolabs_reference(codes).tolist() == [N, N, 0, 2, 1, 0, 3, 0, 1, N]


def test_annotated_mask_reference_drops_pixels_outside_coverage():
    mask = np.array([[0, 1, 2, N]], np.uint8)
    coverage = np.array([[1, 0, 1, 1]], np.uint8)
    assert test_stage.mask_reference(mask, coverage).tolist() == [[0, N, 2, N]]
    assert test_stage.mask_reference(mask, None).tolist() == [[0, 1, 2, N]]


# ---------------------------------------------------------------- the stage on tiny scenes


def exolabs_a() -> np.ndarray:
    """Snow (cols 0-29), glacier ice (30-39), vegetation (40-49), water above not-observed (50-59)."""
    codes = np.full((SIZE, SIZE), 4, np.uint8)
    codes[:, 30:40] = 8
    codes[:, 40:50] = 5
    codes[:30, 50:] = 6
    codes[30:, 50:] = 0
    return codes


def exolabs_b() -> np.ndarray:
    codes = np.full((SIZE, SIZE), 4, np.uint8)
    codes[30:] = 5
    return codes


def prediction_a() -> np.ndarray:
    """ExoLabs' answer, background where ExoLabs did not observe, and no prediction in one corner."""
    predicted = test_stage.exolabs_reference(exolabs_a())
    predicted[predicted == N] = 0
    predicted[:5, :10] = N
    return predicted


def write_prediction(config, date: str, mask: np.ndarray) -> None:
    """A prediction as the infer stage leaves it: mask.tif and its completion record."""
    folder = config.path("results") / "predictions" / sid(date)
    write_raster(folder / "mask.tif", mask, 10, nodata=N)
    records.write_record(folder, records.RecordKey("infer", f"made by hand {mask.sum()}",
                                                   config.section_hash("inference")), ["mask.tif"])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scene(root, DATE_A, SIZE, exolabs=exolabs_a())
    write_scene(root, DATE_B, SIZE, exolabs=exolabs_b())
    return root


@pytest.fixture()
def config(scenes, tmp_path):
    cfg = make_config(scenes, testing={"enable": True},
                      paths={"results": str(tmp_path / "results"), "annotated_masks": str(tmp_path / "masks")})
    write_prediction(cfg, DATE_A, prediction_a())
    write_prediction(cfg, DATE_B, np.ones((SIZE, SIZE), np.uint8))  # snow everywhere
    return cfg


def test_stage_against_exolabs_writes_metrics_csv_and_plots(config, monkeypatch, capsys):
    monkeypatch.setattr(test_stage, "WINDOW", 25)  # windows that do not divide the scene
    report = test_stage.run(config)
    assert report.count("done") == 2 and not report.failed
    out = config.path("results") / "testing"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"] == "exolabs" and list(metrics["scenes"]) == [sid(DATE_A), sid(DATE_B)]

    a = metrics["scenes"][sid(DATE_A)]
    # Glacier ice counts as snow; the unobserved strip (predicted background) and the corner without a
    # prediction are ignored, so scene A is a perfect match over the three classes present.
    assert a["confusion_matrix"] == [[600, 0, 0, 0], [0, 2350, 0, 0], [0, 0, 0, 0], [0, 0, 0, 300]]
    assert a["pixels"] == {"total": 3600, "compared": 3250, "ignored": 350}
    assert a["miou"] == 1.0 and a["classes"]["clouds"]["iou"] is None

    b = metrics["scenes"][sid(DATE_B)]
    assert b["classes"]["snow"]["iou"] == pytest.approx(0.5) and b["classes"]["background"]["iou"] == 0.0
    assert b["miou"] == pytest.approx(0.25)

    overall = metrics["overall"]
    assert overall["confusion_matrix"] == [[600, 1800, 0, 0], [0, 4150, 0, 0], [0, 0, 0, 0], [0, 0, 0, 300]]
    assert overall["classes"]["background"]["iou"] == pytest.approx(600 / 2400)
    assert overall["classes"]["snow"]["iou"] == pytest.approx(4150 / 5950, abs=1e-6)
    assert overall["miou"] == pytest.approx((0.25 + 4150 / 5950 + 1.0) / 3, abs=1e-6)
    assert overall["mean_scene_miou"] == pytest.approx(0.625)

    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * (len(CLASS_NAMES) + 1)  # two scenes, their tile, overall
    tile_all = next(r for r in rows if r["scope"] == "tile 32TNS" and r["class"] == "all")
    assert float(tile_all["iou"]) == pytest.approx(overall["miou"])  # one tile: the tile is the whole
    snow_b = next(r for r in rows if r["scope"] == sid(DATE_B) and r["class"] == "snow")
    assert float(snow_b["iou"]) == pytest.approx(0.5) and int(snow_b["pixels"]) == 1800
    overall_all = next(r for r in rows if r["scope"] == "overall" and r["class"] == "all")
    assert float(overall_all["iou"]) == pytest.approx(overall["miou"])

    for name in ("confusion_matrix.png", "iou_per_scene.png", "iou_per_tile.png", f"difference_{sid(DATE_A)}.png",
                 f"difference_{sid(DATE_B)}.png"):
        image = matplotlib.image.imread(out / name)
        assert min(image.shape[:2]) >= 200
    assert (out / records.RECORD_NAME).is_file()
    err = capsys.readouterr().err
    assert "snow" in err and DATE_B in err and "mIoU" in err  # the printed tables


def test_annotated_masks_reference_with_coverage(config):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, :30] = 1
    mask[50:, :] = N  # no annotation
    coverage = np.ones((SIZE, SIZE), np.uint8)
    coverage[:, 30:40] = 0  # annotated as background, but outside coverage: prediction B says snow there
    folder = config.path("annotated_masks") / sid(DATE_B)
    write_raster(folder / "mask.tif", mask, 10, nodata=N)
    write_raster(folder / "coverage.tif", coverage, 10)
    cfg = config.model_copy(update={"testing": config.testing.model_copy(
        update={"reference": "annotated_masks", "dates": [DATE_B]})})
    test_stage.run(cfg)
    metrics = json.loads((cfg.path("results") / "testing" / "metrics.json").read_text())
    assert metrics["reference"] == "annotated_masks" and list(metrics["scenes"]) == [sid(DATE_B)]
    b = metrics["scenes"][sid(DATE_B)]
    # Compared: rows 0-49 without cols 30-39: 50 x 30 snow hits, 50 x 20 background predicted as snow.
    assert b["confusion_matrix"] == [[0, 1000, 0, 0], [0, 1500, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert b["classes"]["snow"]["iou"] == pytest.approx(0.6)


def test_missing_prediction_is_named_and_the_other_scene_is_still_measured(config):
    missing = config.path("results") / "predictions" / sid(DATE_B) / "mask.tif"
    missing.unlink()
    with pytest.raises(StageFailed) as failure:
        test_stage.run(config)
    message = str(failure.value)
    assert str(missing) in message and "run the infer stage" in message and DATE_B in message
    out = config.path("results") / "testing"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["scenes"]) == [sid(DATE_A)] and sid(DATE_B) in metrics["failed"]
    assert not (out / records.RECORD_NAME).exists()  # incomplete: the next run tries again


def test_a_complete_test_is_skipped_until_forced_or_a_prediction_changes(config):
    out = config.path("results") / "testing"
    assert test_stage.run(config).count("done") == 2
    first = (out / "metrics.json").stat().st_mtime_ns
    again = test_stage.run(config)
    assert again.count("skipped") == 2 and (out / "metrics.json").stat().st_mtime_ns == first
    assert test_stage.run(config, force=True).count("done") == 2
    prediction = config.path("results") / "predictions" / sid(DATE_A) / "mask.tif"
    stamp = prediction.stat().st_mtime_ns + 10**9
    os.utime(prediction, ns=(stamp, stamp))  # touched or copied, not changed: still complete
    assert test_stage.run(config).count("skipped") == 2
    write_prediction(config, DATE_A, np.zeros((SIZE, SIZE), np.uint8))  # infer ran again with another result
    assert test_stage.run(config).count("done") == 2


def test_a_prediction_without_its_infer_record_is_not_scored(config):
    """A failed or interrupted infer (or a stale copy) leaves mask.tif without a matching record."""
    folder = config.path("results") / "predictions" / sid(DATE_B)
    (folder / records.RECORD_NAME).unlink()
    with pytest.raises(StageFailed) as failure:
        test_stage.run(config)
    assert "not the infer stage's complete output" in str(failure.value) and DATE_B in str(failure.value)
    metrics = json.loads((config.path("results") / "testing" / "metrics.json").read_text())
    assert list(metrics["scenes"]) == [sid(DATE_A)] and sid(DATE_B) in metrics["failed"]


def test_a_prediction_changed_after_its_record_is_not_scored(config):
    folder = config.path("results") / "predictions" / sid(DATE_B)
    write_raster(folder / "mask.tif", np.zeros((SIZE + 3, SIZE), np.uint8), 10, nodata=N)  # other size
    with pytest.raises(StageFailed, match="not the infer stage's complete output"):
        test_stage.run(config)


def test_testing_dates_fall_back_to_inference_then_top_level_dates(scenes):
    base = make_config(scenes).model_copy(update={"dates": [DATE_A]})
    assert stage_dates(base, "test") == [DATE_A]
    cfg = make_config(scenes, inference={"dates": [DATE_B]}).model_copy(update={"dates": [DATE_A, DATE_B]})
    assert stage_dates(cfg, "test") == [DATE_B]
    assert stage_dates(cfg, "test", [DATE_A]) == [DATE_A]
