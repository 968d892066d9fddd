"""Time and peak memory of annotating one scene, at two scene sizes: memory must not grow with the scene.

usage: python bench/annotate_scene.py [--sizes 2745,10980] [--resolution 10] [--workdir build/bench]

For each size, one demo scene is generated (once; kept in the work folder), then
`snowpipe stage annotate CONFIG --force` runs in a child process; its wall time and peak resident
memory (what `/usr/bin/time -v` reports as "Maximum resident set size") are printed, with the ratios
of the largest to the smallest size: memory should stay ~1x while time grows with the pixels.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml


def prepare(workdir: Path, size: int, resolution: int) -> Path:
    out = workdir / f"scene-{size}"
    if not (out / "pipeline-config.yml").is_file():
        subprocess.run([sys.executable, "-m", "pipeline", "demo-data", str(out), "--scenes", "1",
                        "--size", str(size), "--seed", "5"], check=True)
    config = yaml.safe_load((out / "pipeline-config.yml").read_text())
    config["annotation"]["workers"] = 1
    config["annotation"]["cloud_detection"]["resolution"] = resolution
    config["annotation"]["cloud_detection"]["window"] = 1024
    path = out / f"bench-{resolution}m.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(config: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one annotate run in a fresh child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config), "--force"], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: a previous child had a larger peak; run sizes from small to large", file=sys.stderr)
    return seconds, peak / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2745,10980", help="scene sizes in pixels, small to large")
    parser.add_argument("--resolution", type=int, default=10, choices=(10, 20, 60), help="cloud detector grid (m)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    for size in sizes:
        config = prepare(args.workdir, size, args.resolution)
        seconds, gib = measure(config)
        rows.append((size, seconds, gib))
        print(f"size {size:>6} px  clouds at {args.resolution} m: {seconds:8.1f} s  "
              f"{size * size / seconds / 1e6:6.2f} Mpx/s  peak RSS {gib:5.2f} GiB", flush=True)
    if len(rows) > 1:
        (s0, t0, m0), (s1, t1, m1) = rows[0], rows[-1]
        print(f"ratio {s1}/{s0} px: pixels x{(s1 / s0) ** 2:.1f}, time x{t1 / t0:.1f}, peak memory x{m1 / m0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
