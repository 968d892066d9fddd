"""Segmentation metrics from one accumulated confusion matrix (never an average of per-batch ratios)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.bands import CLASS_NAMES, NODATA


def confusion_matrix(predicted: np.ndarray, reference: np.ndarray, n_classes: int = len(CLASS_NAMES),
                     ignore: int = NODATA) -> np.ndarray:
    """Counts (reference class, predicted class); pixels where either side is `ignore` are left out."""
    keep = (reference != ignore) & (predicted != ignore) & (reference < n_classes) & (predicted < n_classes)
    index = reference[keep].astype(np.int64) * n_classes + predicted[keep].astype(np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_scores(matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """IoU, Dice, precision and recall per class; NaN where a class is absent from both sides."""
    true_positive = np.diag(matrix).astype(float)
    predicted = matrix.sum(0).astype(float)
    actual = matrix.sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = true_positive / (predicted + actual - true_positive)
        dice = 2 * true_positive / (predicted + actual)
        precision = true_positive / predicted
        recall = true_positive / actual
    names = CLASS_NAMES[: matrix.shape[0]]
    return {name: {"iou": float(iou[i]), "dice": float(dice[i]), "precision": float(precision[i]),
                   "recall": float(recall[i])} for i, name in enumerate(names)}


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes present in the reference or the prediction (NaN when nothing compared)."""
    present = (matrix.sum(0) + matrix.sum(1)) > 0
    if not present.any():
        return math.nan
    ious = [scores["iou"] for scores in class_scores(matrix).values()]
    return float(np.mean(np.asarray(ious)[present]))


def json_number(value: float | None) -> float | None:
    """JSON has no NaN: a score that is undefined (a class absent from both sides) is null."""
    return None if value is None or math.isnan(value) else round(float(value), 6)
