"""How well the U-Net trained by the demo's recipe segments scenes nothing was chosen on.

usage: python bench/model_quality.py [--quick] [--seeds 5,11,23] [--threads 1,2] [--set KEY=VALUE ...]
                                     [--work DIR] [--label NAME]

For each demo seed (fixed below): `snowpipe demo-data` makes 6 scenes of 480 px; the first 4 are the training
side (3 training scenes, the 4th the validation scene that picks best.pt), the last 2 are test scenes that
nothing is chosen on. annotate -> dataset run once per seed (once per recipe when it sets dataset.*);
train -> infer run per thread count (OMP_NUM_THREADS, as a SLURM job's --cpus-per-task gives) with the demo
config's recipe, changed by any --set (e.g. --set training.loss=focal). The test scenes' predictions are
scored against the demo's truth. docs/model.md holds the results.

Prints one row per seed and thread count (IoU per class on the test scenes, training minutes, epochs), then
the minimum per class and, last, `water_iou_min <value>`. --quick: the first seed at 2 threads only.
Goals (issue 14): water >= 0.75 on every seed, snow >= 0.9, clouds >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.annotation_quality import scene_matrix  # noqa: E402
from pipeline.bands import CLASS_NAMES  # noqa: E402
from pipeline.metrics import class_scores  # noqa: E402

SEEDS = (5, 11, 23)
THREADS = (1, 2)
SCENES, SIZE, TEST_SCENES = 6, 480, 2


def snowpipe(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"snowpipe {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def set_key(config: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def prepare(seed: int, work: Path) -> tuple[Path, dict, list[str]]:
    """Demo data, automatic masks and the patch dataset of one seed (kept between runs); the config and the
    test scenes' dates."""
    folder = work / f"seed{seed}"
    config_path = folder / "pipeline-config.yml"
    if not (folder / "dataset" / "manifest.json").is_file():
        snowpipe("demo-data", str(folder), "--scenes", str(SCENES), "--size", str(SIZE), "--seed", str(seed),
                 "--force")
    base = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    dates = sorted(p.stem for p in (folder / "truth").glob("*.tif"))
    train_side, test = dates[:-TEST_SCENES], dates[-TEST_SCENES:]
    base["dates"] = train_side
    base["dataset"]["validation_dates"] = train_side[-1:]
    base["inference"]["dates"] = test
    for section in ("training", "inference", "testing"):
        base[section]["enable"] = False
    config_path.write_text(yaml.safe_dump(base, sort_keys=False))
    if not (folder / "dataset" / "manifest.json").is_file():
        snowpipe("run", str(config_path), "--stages", "annotate,dataset")
    return folder, base, test


def train_and_score(folder: Path, base: dict, test: list[str], threads: int, changes: dict[str, object],
                    label: str) -> dict:
    config = json.loads(json.dumps(base))
    for key, value in changes.items():
        set_key(config, key, value)
    results = f"results-{label}-t{threads}"
    config["paths"]["results"] = results
    shutil.rmtree(folder / results, ignore_errors=True)
    config["annotation"]["enable"] = False
    path = folder / f"config-{label}-t{threads}.yml"
    if any(key.startswith("dataset.") for key in changes):  # a dataset of this recipe's own, made once
        config["paths"]["dataset"] = f"dataset-{label}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        if not (folder / f"dataset-{label}" / "manifest.json").is_file():
            snowpipe("run", str(path), "--stages", "dataset")
    config["dataset"]["enable"] = False
    config["training"]["enable"] = config["inference"]["enable"] = True
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    snowpipe("run", str(path), "--stages", "train", threads=threads)
    train_seconds = time.perf_counter() - start
    snowpipe("run", str(path), "--stages", "infer", threads=threads)
    matrix = np.zeros((len(CLASS_NAMES),) * 2, np.int64)
    for date in test:
        matrix += scene_matrix(folder / results / "predictions" / date / "mask.tif", folder / "truth" / f"{date}.tif")
    scores = class_scores(matrix)
    history = json.loads((folder / results / "training" / "history.json").read_text())
    best = max((r["epoch"] for r in history if r.get("best")), default=None)
    return {"iou": {name: scores[name]["iou"] for name in CLASS_NAMES}, "train_minutes": train_seconds / 60,
            "epochs": len(history), "best_epoch": best}


def parse_changes(pairs: list[str]) -> dict[str, object]:
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--set {pair}: expected KEY=VALUE, e.g. training.loss=focal")
        changes[key] = yaml.safe_load(value)
    return changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first seed at 2 threads only")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--threads", default=",".join(map(str, THREADS)))
    parser.add_argument("--set", action="append", default=[], dest="changes", metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("build/model-quality"),
                        help="demo data and runs (kept: a second call reuses the seeds' datasets)")
    parser.add_argument("--label", default="default", help="name of this recipe's result folders")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.quick:
        seeds, threads = seeds[:1], [2]
    changes = parse_changes(args.changes)
    print(f"recipe: demo config{''.join(f', {k}={v}' for k, v in changes.items())}")
    print(f"{'seed':>5} {'threads':>7}" + "".join(f"{name:>11}" for name in CLASS_NAMES)
          + f"{'train min':>10}{'epochs':>7}{'best':>5}")
    rows = []
    for seed in seeds:
        folder, base, test = prepare(seed, args.work.resolve())
        for count in threads:
            row = train_and_score(folder, base, test, count, changes, args.label)
            rows.append(row)
            ious = "".join(f"{row['iou'][name]:>11.3f}" for name in CLASS_NAMES)
            print(f"{seed:>5} {count:>7}{ious}{row['train_minutes']:>10.1f}{row['epochs']:>7}{row['best_epoch']:>5}",
                  flush=True)
    minimum = {name: min(row["iou"][name] for row in rows) for name in CLASS_NAMES}
    mean = {name: sum(row["iou"][name] for row in rows) / len(rows) for name in CLASS_NAMES}
    print(f"{'mean':>13}" + "".join(f"{mean[name]:>11.3f}" for name in CLASS_NAMES)
          + f"{sum(r['train_minutes'] for r in rows) / len(rows):>10.1f}")
    print(f"{'min':>13}" + "".join(f"{minimum[name]:>11.3f}" for name in CLASS_NAMES))
    print(f"water_iou_min {minimum['water']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
