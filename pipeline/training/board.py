"""TensorBoard event files of a training: `results/training/tensorboard/`, written by rank 0 only.

Each finished epoch adds the train and validation loss, the learning rate, pixel accuracy and the per-class IoU
(step = epoch number), and an image of a few validation patches: label beside prediction, in the class colours
of the plots. Events are written before the epoch's checkpoint: a run killed in between redoes that epoch, and
the resumed writer purges everything from the resumed epoch on (`purge_step`), so the step count stays
continuous without duplicates. After `snowpipe fetch RUN`: `tensorboard --logdir runs/RUN/results/training`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.bands import CLASS_NAMES
from pipeline.plots import CLASS_COLOURS

FOLDER = "tensorboard"
IGNORED_COLOUR = (128, 128, 128)
PREVIEW_PATCHES = 4


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


PALETTE = np.array([_rgb(colour) for colour in CLASS_COLOURS], dtype=np.uint8)


def colourise(classes: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the plots' class colours; ignored pixels grey."""
    rgb = np.empty((*classes.shape, 3), dtype=np.uint8)
    rgb[:] = IGNORED_COLOUR
    known = classes < len(PALETTE)
    rgb[known] = PALETTE[classes[known]]
    return rgb


def preview(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """One image: a row per patch, label on the left, prediction on the right, a 2-px white gap."""
    rows = []
    for label, predicted in zip(labels[:PREVIEW_PATCHES], predictions[:PREVIEW_PATCHES]):
        gap = np.full((label.shape[0], 2, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([colourise(label), gap, colourise(predicted)], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    return np.concatenate(rows[:-1], axis=0)


class TrainingBoard:
    """The event writer of one training process (open it on rank 0 only)."""

    def __init__(self, training_folder: Path, finished_epochs: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard loads only when training writes events

        self.writer = SummaryWriter(str(training_folder / FOLDER), purge_step=finished_epochs + 1)

    def epoch(self, record: dict[str, Any], sample: tuple[np.ndarray, np.ndarray] | None) -> None:
        step = int(record["epoch"])
        self.writer.add_scalar("loss/train", record["train_loss"], step)
        self.writer.add_scalar("loss/validation", record["val_loss"], step)
        self.writer.add_scalar("learning_rate", record["lr"], step)
        if record.get("pixel_accuracy") is not None:
            self.writer.add_scalar("validation/pixel_accuracy", record["pixel_accuracy"], step)
        for name in CLASS_NAMES:
            value = record["val_metrics"]["iou"].get(name)
            if value is not None:
                self.writer.add_scalar(f"iou/{name}", value, step)
        if sample is not None:
            self.writer.add_image("validation/label_vs_prediction", preview(*sample), step, dataformats="HWC")
        self.writer.flush()
        faults.reached("wrote tensorboard events")

    def close(self) -> None:
        self.writer.close()
