"""Which epoch is the best model, and how the learning rate moves from epoch to epoch.

best.pt is the epoch with the best `training.select_by` score on the validation scenes: the lowest
validation loss by default (as the thesis), the mean IoU over the classes present (better water, shorter
trainings, lower clouds on one seed of three: docs/model.md), or one class's IoU. Early stopping counts
epochs without a better score. The schedule is ReduceLROnPlateau on the validation loss (the thesis) or a linear warm-up
followed by a cosine decay over `training.epochs`. docs/model.md holds the measurements.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.config import Schedule, SelectBy

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
COSINE_FLOOR = 0.01  # the cosine schedule ends at 1 % of the learning rate, not at 0 (the last epochs still learn)


def selection_score(select_by: SelectBy, val_loss: float, metrics: dict[str, Any]) -> float:
    """The epoch's score, higher is better (the loss is negated); -inf when the metric is undefined (no
    validation pixel of that class), so such an epoch is never the best."""
    if select_by == "val_loss":
        return -val_loss if math.isfinite(val_loss) else -math.inf
    ious = metrics["iou"]
    if select_by == "mean_iou":
        present = [v for v in ious.values() if v is not None]
        return sum(present) / len(present) if present else -math.inf
    value = ious.get(select_by.removesuffix("_iou"))
    return float(value) if value is not None else -math.inf


def describe_score(select_by: SelectBy, score: float) -> str:
    """`val loss 0.5190` or `mean IoU 0.812`, for messages."""
    if select_by == "val_loss":
        return f"val loss {-score:.4f}"
    return f"{select_by.removesuffix('_iou')} IoU {score:.3f}"


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, epochs: int, warmup_epochs: int,
                   factor: float, patience: int) -> Scheduler:
    """Stepped once per epoch (`step_scheduler`)."""
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)

    def cosine(epoch: int) -> float:  # epoch: finished epochs; the factor of the next one's learning rate
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        span = max(1, epochs - warmup_epochs)
        progress = min(1.0, (epoch - warmup_epochs) / span)
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def step_scheduler(scheduler: Scheduler, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def load_scheduler(scheduler: Scheduler, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Restore a saved schedule. The cosine's learning rate is recomputed for the epoch it is at: resuming with
    more `training.epochs` stretches the rest of the decay instead of keeping the old schedule's last rate."""
    scheduler.load_state_dict(saved)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
