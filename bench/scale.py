"""Planning at scale: `snowpipe validate` and `snowpipe plan --json` on trees of 200 and 2,000 scenes of one tile.

usage: python bench/scale.py [--scenes 200,2000] [--repeat 3] [--keep DIR]
Planning reads only the layout (names, file types, the first scene's band headers), so the tree is cheap: one
demo product (`snowpipe demo-data --scenes 1 --size 60`) hard-linked under N sensing times one day apart, with
one ExoLabs raster per day. Each command runs in a fresh process; printed: its median wall time, the child's
peak memory (ru_maxrss from wait4) and the time per scene, and last the ratio of the time per scene at the
largest count to that at the smallest (goal: <= 1.5: planning grows no faster than the scenes), also net of the
start-up a 1-scene tree measures (imports, config, job specs), which otherwise hides how the scenes' part grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from bench_common import machine

from pipeline.data.layout import EXOLABS_FOLDER, SAFE_NAME
from pipeline.demo.config_file import write_demo_config
from pipeline.demo.scenes import generate_demo

SNOWPIPE = Path(sys.executable).parent / "snowpipe"
TILE = "32TNS"
TARGET = '{"snowpipe_remote_root": "/scratch/x"}'


def make_tree(template: Path, out: Path, count: int) -> Path:
    """OUT with the template's config and auxiliary data and COUNT hard-linked products; returns the config."""
    source = template / "extracted_data"
    safe = next(p for p in source.iterdir() if SAFE_NAME.match(p.name))
    bands = sorted(next(safe.glob("GRANULE/*/IMG_DATA")).iterdir())
    exolabs = next((source / EXOLABS_FOLDER).iterdir())
    extracted = out / "extracted_data"
    shutil.copytree(source / f"{TILE}_auxiliary_data", extracted / f"{TILE}_auxiliary_data")
    (extracted / EXOLABS_FOLDER).mkdir(parents=True)
    first = datetime(2021, 12, 20, 10, 23, 9)
    for index in range(count):
        sensing = first + timedelta(days=index)
        key = sensing.strftime("%Y%m%dT%H%M%S")
        processed = (sensing + timedelta(hours=2)).strftime("%Y%m%dT%H%M%S")
        img = (extracted / f"S2A_MSIL1C_{key}_N0400_R065_T{TILE}_{processed}.SAFE" / "GRANULE"
               / f"L1C_T{TILE}_A{30000 + index:06d}_{key}" / "IMG_DATA")
        img.mkdir(parents=True)
        for band in bands:
            os.link(band, img / f"T{TILE}_{key}_{band.name.rsplit('_', 1)[1]}")
        os.link(exolabs, extracted / EXOLABS_FOLDER / f"S2_{TILE}_{sensing:%Y-%m-%d}_classification.tif")
    shutil.copy(template / "pipeline-config.yml", out / "pipeline-config.yml")
    return out / "pipeline-config.yml"


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident set (bytes) of one run of COMMAND; a failure stops the benchmark."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    error = child.stderr.read().decode() if child.stderr else ""
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {child.returncode}): {error.strip()}")
    return seconds, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="200,2000", help="scene counts, comma-separated (default 200,2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the median is kept")
    parser.add_argument("--keep", type=Path, help="build the trees here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.scenes.split(","))
    root = args.keep or Path(tempfile.mkdtemp(prefix="snowpipe-bench-scale-"))
    print(machine())
    try:
        write_demo_config(generate_demo(root / "template", scenes=1, size=60, tiles=[TILE]))
        per_scene: dict[str, dict[int, tuple[float, float]]] = {"validate": {}, "plan": {}}
        start_up: dict[str, float] = {}
        for count in [1, *counts]:
            config = make_tree(root / "template", root / f"scenes-{count}", count)
            commands = {"validate": [str(SNOWPIPE), "validate", str(config)],
                        "plan": [str(SNOWPIPE), "plan", str(config), "--json", "--target-vars", TARGET]}
            for name, command in commands.items():
                runs = [timed(command) for _ in range(args.repeat)]
                seconds, peak = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
                if count == 1:  # start-up (imports, the config, the job specs): what every count pays once
                    start_up[name] = seconds
                else:
                    per_scene[name][count] = (seconds, (seconds - start_up[name]) / (count - 1))
                print(f"{count:6d} scenes  snowpipe {name:<8s} {seconds:6.2f} s  peak {peak / 2**20:6.0f} MiB  "
                      f"{1000 * seconds / count:6.2f} ms/scene")
        low, high = counts[0], counts[-1]
        ratios = {name: (times[high][0] / high / (times[low][0] / low), times[high][1] / times[low][1])
                  for name, times in per_scene.items()}
        for name, (ratio, net) in ratios.items():
            print(f"{name}: time per scene at {high} / at {low} {ratio:.2f}, net of the 1-scene start-up {net:.2f}")
        print(f"time per scene at {high} / at {low} (goal <= 1.5): {max(r for r, _ in ratios.values()):.2f} "
              f"({max(n for _, n in ratios.values()):.2f} net of start-up)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
