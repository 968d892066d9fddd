"""Annotated masks on disk: {annotated_masks}/{scene id}/mask.tif + coverage.tif (thesis .jp2 names and the
one-tile date-only folders too: pipeline/data/scene_folders.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.layout import Scene
from pipeline.data.scene_folders import read_folder

MASK_NAMES = ("mask.tif", "mask.jp2")
COVERAGE_NAMES = ("coverage.tif", "coverage.jp2", "mask_coverage.jp2")


@dataclass(frozen=True)
class MaskFiles:
    scene: str
    mask: Path | None
    coverage: Path | None


def find_mask(root: Path, scene: Scene, tiles: Sequence[str]) -> MaskFiles:
    folder = read_folder(root, scene, tiles)
    mask = next((folder / n for n in MASK_NAMES if (folder / n).is_file()), None)
    coverage = next((folder / n for n in COVERAGE_NAMES if (folder / n).is_file()), None)
    return MaskFiles(scene.id, mask, coverage)
