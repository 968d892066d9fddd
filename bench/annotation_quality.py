"""Score a demo folder's masks against the demo's true class maps.

usage: python bench/annotation_quality.py DEMO_DIR [--predictions [--results RESULTS_DIR]]
  (after `snowpipe run DEMO_DIR/pipeline-config.yml`, or a cluster run: --results RUN_FOLDER/results)
Scores the annotate stage's masks, or with --predictions the infer stage's
(results/predictions/{date}/mask.tif). Prints IoU per class and scene, and overall.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio

from pipeline.bands import CLASS_NAMES
from pipeline.metrics import class_scores, confusion_matrix


def scene_matrix(mask_path: Path, truth_path: Path) -> np.ndarray:
    total = np.zeros((4, 4), np.int64)
    with rasterio.open(mask_path) as mask, rasterio.open(truth_path) as truth:
        for _, window in mask.block_windows(1):
            total += confusion_matrix(mask.read(1, window=window), truth.read(1, window=window))
    return total


def main(demo: Path, predictions: bool = False, results: Path | None = None) -> int:
    overall = np.zeros((4, 4), np.int64)
    print(f"{'scene':<23}" + "".join(f"{name:>12}" for name in CLASS_NAMES) + "   (IoU vs truth)")
    for truth_path in sorted((demo / "truth").glob("*.tif")):
        folder = (results or demo / "results") / "predictions" if predictions else demo / "annotated_masks"
        mask_path = folder / truth_path.stem / "mask.tif"
        if not mask_path.is_file():
            print(f"{truth_path.stem:<23} no mask ({mask_path} is missing)")
            continue
        matrix = scene_matrix(mask_path, truth_path)
        overall += matrix
        scores = class_scores(matrix)
        print(f"{truth_path.stem:<23}" + "".join(f"{scores[n]['iou']:>12.3f}" for n in CLASS_NAMES))
    scores = class_scores(overall)
    print(f"{'all scenes':<17}" + "".join(f"{scores[n]['iou']:>12.3f}" for n in CLASS_NAMES))
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--predictions"]
    results = None
    if "--results" in args:  # predictions of a cluster run: --results RUN_FOLDER/results
        at = args.index("--results")
        results = Path(args[at + 1])
        del args[at:at + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    sys.exit(main(Path(args[0]), predictions="--predictions" in sys.argv, results=results))
