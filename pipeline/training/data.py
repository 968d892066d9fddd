"""Training patches from the dataset stage's memory-mapped arrays, with augmentation.

Arrays are opened lazily in each data-loader worker (np.load with mmap_mode), so workers share
the page cache instead of copying the dataset. Augmentations follow the thesis (flips, channel
dropout, random erasing) with one fix: erased pixels are *ignored* by the loss (255) instead of
being trained as "no class at all".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.bands import NODATA
from pipeline.config import Augmentation
from pipeline.errors import DataError

IGNORE = NODATA
CHANNEL_DROP_RATE = 0.3  # each channel of an affected patch is zeroed with this probability (thesis)


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(f"no dataset at {folder} (manifest.json missing): run the dataset stage first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Augmenter:
    settings: Augmentation
    max_erase: int

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator) \
            -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        if rng.random() < s.flip:
            image, mask = image.flip(-2), mask.flip(-2)
        if rng.random() < s.flip:
            image, mask = image.flip(-1), mask.flip(-1)
        if rng.random() < s.channel_dropout:
            drop = torch.from_numpy(rng.random(image.shape[0]) < CHANNEL_DROP_RATE)
            image = image.clone()
            image[drop] = 0
        if rng.random() < s.random_erasing:
            side = int(rng.integers(max(1, self.max_erase // 16), self.max_erase + 1))
            r, c = (int(rng.integers(0, n - side + 1)) for n in mask.shape)
            image, mask = image.clone(), mask.clone()
            image[:, r:r + side, c:c + side] = 0
            mask[r:r + side, c:c + side] = IGNORE
        return image, mask


class PatchDataset(Dataset):
    """(image float32 (C, P, P), mask int64 (P, P)) pairs of one split."""

    def __init__(self, folder: Path, split: str, augment: Augmenter | None = None, seed: int = 0) -> None:
        info = read_manifest(folder)["splits"][split]
        self.images_path, self.masks_path = folder / info["images"], folder / info["masks"]
        self.length = int(info["patches"])
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None or self._masks is None:
            self._images = np.load(self.images_path, mmap_mode="r")
            self._masks = np.load(self.masks_path, mmap_mode="r")
        image = torch.from_numpy(np.asarray(self._images[index], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(self._masks[index], dtype=np.int64))
        if self.augment is not None:
            # Seeded by (seed, epoch, index): reproducible whatever the worker that draws the sample.
            image, mask = self.augment(image, mask, np.random.default_rng([self.seed, self.epoch, index]))
        return image, mask


def class_weights(manifest: dict, mode: str) -> torch.Tensor | None:
    """Loss weights from the training split's class pixels (thesis: sqrt of (1 - f) / f), mean 1."""
    if mode == "none":
        return None
    pixels = np.asarray(manifest["splits"]["train"]["class_pixels"], np.float64)
    frequency = np.clip(pixels / max(pixels.sum(), 1.0), 1e-6, 1.0)
    weights = (1.0 - frequency) / frequency
    if mode == "sqrt_inverse_frequency":
        weights = np.sqrt(weights)
    weights = np.clip(weights, 1e-3, None)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)
