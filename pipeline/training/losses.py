"""Training losses for a segmentation where one class is rare (lakes: ~1 % of the pixels).

`training.loss` picks one:
- cross_entropy: class-weighted cross-entropy (the thesis' loss).
- cross_entropy_dice: that plus a soft Dice term averaged over classes, so a rare class counts as much as a
  common one whatever its pixel count.
- focal: cross-entropy scaled by (1 - p_true)^gamma, so pixels the model already gets right weigh little.

Every loss ignores pixels labelled IGNORE (no data, unannotated) and is computed in float32 whatever the
autocast precision. docs/model.md holds the measurements that chose the default.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from pipeline.config import LossName

LOSSES: tuple[LossName, ...] = get_args(LossName)
DICE_SMOOTH = 1.0  # keeps a class absent from a batch (no pixels predicted or true) at Dice loss 0, not 0/0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax probabilities and the one-hot target,
    over the valid pixels of the whole batch (per-batch, not per-image: small patches often lack a class)."""
    n_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1) * valid
    one_hot = F.one_hot(target.clamp(0, n_classes - 1), n_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    sizes = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + DICE_SMOOTH) / (sizes + DICE_SMOOTH)
    return 1 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
               gamma: float, reduction: str = "mean") -> torch.Tensor:
    """Class-weighted focal loss (Lin et al. 2017); `mean` divides by the summed weights of the valid pixels,
    like weighted cross-entropy, so its scale does not change with the share of ignored pixels."""
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p_true = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
    pixel_weight = weight[safe] if weight is not None else torch.ones_like(log_p_true)
    pixel_weight = pixel_weight * valid
    losses = -((1 - log_p_true.exp()) ** gamma) * log_p_true * pixel_weight
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / pixel_weight.sum().clamp(min=1e-12)


def segmentation_loss(name: LossName, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                      ignore_index: int, gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """The configured loss. "mean" divides by the summed weights of the valid pixels (a batch without any is
    0, not NaN: torch's cross-entropy mean would stop the training). "sum" (validation sums over batches, then
    divides by the summed pixel weights) scales the per-batch Dice term by the batch's summed weights, so the
    validation loss stays comparable across batches of different sizes."""
    if name == "focal":
        return focal_loss(logits, target, weight, ignore_index, gamma, reduction)
    valid = target != ignore_index
    pixel_weights = weight[target[valid]].sum() if weight is not None else valid.sum().to(logits.dtype)
    ce = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    if reduction != "sum":
        ce = ce / pixel_weights.clamp(min=1e-12)
    if name == "cross_entropy":
        return ce
    dice = soft_dice_loss(logits, target, ignore_index)
    return ce + dice * (pixel_weights if reduction == "sum" else 1)
