"""PNG plots of training and testing results, drawn with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global figure state, no GUI
backend (batch nodes have no display), and nothing to close. Every PNG is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pipeline.bands import CLASS_NAMES, NODATA
from pipeline.data.writer import atomic_path, check_png

# background, snow, clouds, water: the colours of the mask previews (pipeline/data/preview.py).
CLASS_COLOURS = ("#227822", "#00dcff", "#ff00c8", "#1428dc")
# Difference map categories: ignored, agreement on each class (pale), disagreement.
IGNORED, DISAGREE = 0, len(CLASS_NAMES) + 1
DIFFERENCE_COLOURS = ("#d9d9d9", "#a6d8a6", "#b3f1ff", "#ffb3ee", "#a1aaf1", "#d7191c")


def save_figure(figure: Figure, target: Path, dpi: int = 100, bbox_inches: str | None = "tight") -> Path:
    """Write the figure as PNG under a temporary name first, so a killed job leaves no half image; the
    file is checked whole before it takes its name, and a full or read-only folder is one OutputError."""
    FigureCanvasAgg(figure)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox_inches)
        check_png(tmp, target)
    return target


def plot_confusion_matrix(matrix: np.ndarray, target: Path, class_names: Sequence[str] = CLASS_NAMES,
                          title: str = "Confusion matrix") -> Path:
    """Heat map normalised per reference class (rows: recall on the diagonal), with raw counts in cells."""
    matrix = np.asarray(matrix, dtype=np.int64)
    totals = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    n = matrix.shape[0]
    figure = Figure(figsize=(1.4 * n + 2.5, 1.2 * n + 1.5))
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, label="share of reference pixels")
    for row in range(n):
        for col in range(n):
            colour = "white" if shares[row, col] > 0.6 else "black"
            ax.text(col, row, f"{shares[row, col]:.1%}\n{matrix[row, col]:,}", ha="center", va="center",
                    fontsize=8, color=colour)
    names = list(class_names)[:n]
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    ax.set_title(title)
    return save_figure(figure, target)


def plot_iou_per_scene(scenes: Mapping[str, Mapping[str, float | None]], target: Path,
                       title: str = "IoU per scene") -> Path:
    """Grouped bars: for each scene (x), the IoU of each class and the multi-class IoU ("mIoU").

    `scenes` maps a date to {series name: value}; None or NaN (a class absent from both masks) is no bar.
    """
    dates = list(scenes)
    series = list(dict.fromkeys(name for values in scenes.values() for name in values))
    colours = {name: CLASS_COLOURS[i] for i, name in enumerate(CLASS_NAMES)}
    width = 0.8 / max(1, len(series))
    figure = Figure(figsize=(min(40.0, max(6.0, 0.9 * len(dates) + 3)), 4.5))
    ax = figure.add_subplot()
    for i, name in enumerate(series):
        values = [_number(scenes[d].get(name)) for d in dates]
        positions = np.arange(len(dates)) + (i - (len(series) - 1) / 2) * width
        ax.bar(positions, values, width, label=name, color=colours.get(name, "#404040"))
    ax.set_xticks(range(len(dates)), dates, rotation=45 if len(dates) > 3 else 0,
                  ha="right" if len(dates) > 3 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(figure, target)


def difference_categories(predicted: np.ndarray, reference: np.ndarray, n_classes: int = len(CLASS_NAMES),
                          ignore: int = NODATA) -> np.ndarray:
    """0 where either side is ignored, 1 + class where both agree, n_classes + 1 where they disagree."""
    out = np.full(predicted.shape, n_classes + 1, np.uint8)
    agree = predicted == reference
    out[agree] = predicted[agree] + 1
    invalid = (predicted == ignore) | (reference == ignore) | (predicted >= n_classes) | (reference >= n_classes)
    out[invalid] = IGNORED
    return out


def plot_difference_map(predicted: np.ndarray, reference: np.ndarray, target: Path,
                        title: str = "Prediction vs reference") -> Path:
    """Where prediction and reference agree (per class), disagree, or are not compared; with a legend.

    The arrays are expected already reduced (about 1024 px a side); one figure pixel per array pixel.
    """
    categories = difference_categories(predicted, reference)
    height, width = categories.shape
    total = max(1, int((categories != IGNORED).sum()))
    disagree = int((categories == DISAGREE).sum())
    scale = max(4.0, max(height, width) / 100) / max(height, width)
    figure = Figure(figsize=(width * scale + 2.6, height * scale + 0.6))
    ax = figure.add_subplot()
    ax.imshow(categories, cmap=ListedColormap(DIFFERENCE_COLOURS), vmin=0, vmax=len(DIFFERENCE_COLOURS) - 1,
              interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{title}\ndisagreement: {disagree / total:.1%} of compared pixels", fontsize=9)
    labels = ["not compared", *(f"agree: {name}" for name in CLASS_NAMES), "disagree"]
    handles = [Patch(facecolor=c, edgecolor="#808080", label=label) for c, label in zip(DIFFERENCE_COLOURS, labels)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
    return save_figure(figure, target)


def _number(value: object) -> float:
    """A plottable float: None and non-numbers become NaN (matplotlib leaves a gap)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def plot_training_curves(history: list[dict], out_dir: Path | str) -> list[Path]:
    """Write `loss.png` (train and validation loss, learning rate) and `iou.png` (validation IoU per class).

    `history` is the list of history.json: one record per epoch with "epoch", "train_loss", "val_loss",
    "lr" and "val_metrics": {"iou": {class: value}}; missing keys or None values leave gaps, never fail.
    Returns the paths written (none for an empty history).
    """
    out_dir = Path(out_dir)
    if not history:
        return []
    epochs = [_number(record.get("epoch", i + 1)) for i, record in enumerate(history)]
    written = [_loss_plot(history, epochs, out_dir / "loss.png")]
    ious = [(record.get("val_metrics") or {}).get("iou") or {} for record in history]
    written.append(_iou_plot(ious, epochs, out_dir / "iou.png"))
    return written


def _loss_plot(history: list[dict], epochs: list[float], target: Path) -> Path:
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    for key, label, colour in (("train_loss", "training loss", "#1f77b4"), ("val_loss", "validation loss", "#ff7f0e")):
        values = [_number(record.get(key)) for record in history]
        if not all(math.isnan(v) for v in values):
            ax.plot(epochs, values, marker="o", markersize=3, label=label, color=colour)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    rates = [_number(record.get("lr")) for record in history]
    handles, labels = ax.get_legend_handles_labels()
    if not all(math.isnan(r) for r in rates):
        lr_ax = ax.twinx()
        (line,) = lr_ax.plot(epochs, rates, linestyle="--", color="#7f7f7f", label="learning rate")
        if all(r > 0 for r in rates if not math.isnan(r)):
            lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        handles.append(line)
        labels.append("learning rate")
    if handles:
        ax.legend(handles, labels, loc="upper right", frameon=False)
    ax.set_title("Loss per epoch")
    return save_figure(figure, target)


def _iou_plot(ious: list[dict], epochs: list[float], target: Path) -> Path:
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    names = list(dict.fromkeys(name for record in ious for name in record))
    colours = {name: CLASS_COLOURS[i] for i, name in enumerate(CLASS_NAMES)}
    for name in names:
        values = [_number(record.get(name)) for record in ious]
        ax.plot(epochs, values, marker="o", markersize=3, label=name, color=colours.get(name))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation IoU")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(loc="best", frameon=False)
    ax.set_title("Validation IoU per class")
    return save_figure(figure, target)
