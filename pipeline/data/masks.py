"""Annotated masks on disk: {annotated_masks}/{date}/mask.tif + coverage.tif (thesis .jp2 names too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MASK_NAMES = ("mask.tif", "mask.jp2")
COVERAGE_NAMES = ("coverage.tif", "coverage.jp2", "mask_coverage.jp2")


@dataclass(frozen=True)
class MaskFiles:
    date: str
    mask: Path | None
    coverage: Path | None


def find_mask(root: Path, date: str) -> MaskFiles:
    folder = root / date
    mask = next((folder / n for n in MASK_NAMES if (folder / n).is_file()), None)
    coverage = next((folder / n for n in COVERAGE_NAMES if (folder / n).is_file()), None)
    return MaskFiles(date, mask, coverage)
