"""What the decode stage costs and what it buys: JPEG 2000 band files against the decoded GeoTIFFs.

usage: python bench/decode.py [--quick] [--size PX] [--scenes N] [--workdir build/bench-decode]

1. Decode: each demo scene's 13 JPEG 2000 band files decoded by the decode stage's `decode_bands` into a
   temporary folder, at 1 thread and at all usable threads (os.sched_getaffinity), each run in a fresh
   process (so that its peak resident memory is its own). Per scene: wall time, core-seconds (user + system
   CPU), Mpx/s, and the parallel efficiency wall(1) / (threads x wall(all)). Goal: >= 0.8 on 2 cores.
2. Bytes on disk per scene: the decoded folder against the JPEG 2000 files.
3. Read speed: every band read fully, single-threaded (GDAL_NUM_THREADS=1, windows of 1024 rows), from the
   JPEG 2000 files and from the decoded GeoTIFFs, the page cache of the files read dropped before every pass
   on both sides. Two measures: Mpx/s of wall-clock time (pixels / elapsed seconds: what a reader waits,
   I/O included) and Mpx/s per core (pixels / CPU seconds: the CPU work alone, blind to I/O wait; the only
   measure before 2026-12-04). The decoded files are about 1.6x the JPEG 2000 bytes, so the wall-clock ratio
   is the honest one. Goal: decoded >= 25x JPEG 2000.
4. Memory: the decoding's peak resident memory, and the bound for a full 10980 px scene (about two strips
   per thread; a strip is one JPEG 2000 tile row of a band) at 16 threads against the goal of 4 GB.

Before every timing the page cache of the files read is dropped with posix_fadvise(DONTNEED) (best effort:
the kernel may keep pages, and nothing else on the machine is stopped). The last line, the headline, is
`decode_read_speedup <ratio> (wall-clock, cold cache; CPU seconds <ratio>)`: decoded Mpx/s / JPEG 2000 Mpx/s
in wall-clock time, cold cache on both sides; the ratio in CPU seconds (the headline before 2026-12-04) beside
it.

--quick: one 2048 px scene (at 1024 px the 60 m bands are 171 px wide and per-call costs dominate the read
speed). Default: two 2048 px scenes. The generated demo data is kept under the workdir
and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rasterio
import rasterio.env
from bench_common import drop_cache, machine, usable_threads
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.data.layout import Scene, discover_scenes
from pipeline.data.reader import BLOCK_CACHE_BYTES
from pipeline.demo import generate_demo
from pipeline.stages.decode import STRIP_ROWS, band_file, decode_bands

TILE = "32TNS"
SEED = 7
READ_ROWS = 1024
FULL_SIZE = 10980  # a Sentinel-2 tile at 10 m
FULL_THREADS = 16
MEMORY_GOAL = 4e9


# ---- helpers ---------------------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its peak (VmHWM) from /proc, 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_resident_bytes() -> int:
    """The process's peak resident set. VmHWM first: Linux carries ru_maxrss over an exec, so a child's
    ru_maxrss is at least its parent's peak (the demo generation's, here); VmHWM starts afresh."""
    return resident_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def jp2_files(scene: Scene) -> list[Path]:
    return [scene.band_path(band) for band in BANDS]


def scene_pixels(scene: Scene) -> int:
    total = 0
    for path in jp2_files(scene):
        with rasterio.open(path) as source:
            total += source.width * source.height
    return total


def prepare_scenes(workdir: Path, size: int, count: int) -> list[Scene]:
    """Demo scenes of `size` px, generated once and kept (a marker file says the generation finished)."""
    root = workdir / f"scenes-{size}px-{count}-seed{SEED}"
    marker = root / "generated.json"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {count} demo scene(s) of {size} px under {root} (once; kept for later runs)", flush=True)
        start = time.perf_counter()
        summary = generate_demo(root, scenes=count, size=size, seed=SEED)
        marker.write_text(json.dumps({"dates": summary.dates, "size": size, "seed": SEED,
                                      "seconds": round(time.perf_counter() - start, 1)}))
    scenes = discover_scenes(root / "extracted_data", TILE)
    if len(scenes) != count:
        sys.exit(f"expected {count} scene(s) in {root}, found {len(scenes)}: delete the folder and rerun")
    return scenes


# ---- one decode, in its own process ----------------------------------------------------------------------------

def decode_child(extracted: Path, date: str, out_dir: Path, threads: int) -> dict:
    """Runs in a fresh process: decode one scene with decode_bands and measure it."""
    scene = next(s for s in discover_scenes(extracted, TILE) if s.date == date)
    with rasterio.Env(), rasterio.open(scene.band_path(BANDS[0])):
        pass  # driver registration outside the timing
    cached = drop_cache(jp2_files(scene))
    baseline = resident_bytes()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    details = decode_bands(scene, out_dir, threads)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "cpu": cpu, "pixels": details["pixels"], "baseline": baseline,
            "peak": peak_resident_bytes(),
            "preempted": usage.ru_nivcsw, "cache_dropped": cached}


def run_decode(scene: Scene, out_dir: Path, threads: int) -> dict:
    extracted = scene.safe_dir.parent
    while extracted.name != "extracted_data" and extracted != extracted.parent:
        extracted = extracted.parent
    job = json.dumps({"extracted": str(extracted), "date": scene.date, "out": str(out_dir), "threads": threads})
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", job],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"decoding {scene.date} at {threads} thread(s) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- reading ---------------------------------------------------------------------------------------------------

def read_timed(paths: list[Path], min_cpu: float) -> tuple[int, float, float]:
    """Read every file fully, one thread, in windows of READ_ROWS rows, dropping the page cache before each
    pass (a cold read every time); repeated until at least `min_cpu` CPU seconds. Returns pixels read, CPU
    seconds (process_time) and wall-clock seconds (perf_counter) of the passes."""
    pixels, cpu, wall = 0, 0.0, 0.0
    with rasterio.Env(GDAL_NUM_THREADS="1"):
        while cpu < min_cpu or pixels == 0:
            drop_cache(paths)
            start, start_wall = time.process_time(), time.perf_counter()
            for path in paths:
                with rasterio.open(path) as source:
                    for row in range(0, source.height, READ_ROWS):
                        rows = min(READ_ROWS, source.height - row)
                        source.read(1, window=Window(0, row, source.width, rows))
                    pixels += source.width * source.height
            cpu += time.process_time() - start
            wall += time.perf_counter() - start_wall
    return pixels, cpu, wall


# ---- main ------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 2048 px scene (well under 2 minutes)")
    parser.add_argument("--size", type=int, help="scene size in px (default: 2048)")
    parser.add_argument("--scenes", type=int, help="number of scenes (default: 1 with --quick, else 2)")
    parser.add_argument("--repeat", type=int, help="decodes per scene and thread count, the fastest counts "
                                                     "(default: 2 with --quick, else 3)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-decode"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(decode_child(Path(job["extracted"]), job["date"], Path(job["out"]), job["threads"])))
        return 0

    size = args.size or 2048
    count = args.scenes or (1 if args.quick else 2)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scenes = prepare_scenes(workdir, size, count)
    threads = usable_threads()
    repeat = args.repeat or (2 if args.quick else 3)
    print(machine())
    print(f"{count} demo scene(s) of {size} px, 13 bands at native resolution; 1 and {threads} thread(s); "
          f"page cache dropped before each timing (posix_fadvise DONTNEED, best effort)", flush=True)

    totals: dict[int, dict[str, float]] = {}
    jp2_bytes = decoded_bytes = 0
    pixels = 0
    jp2_read = [0, 0.0, 0.0]  # pixels, CPU seconds, wall-clock seconds
    tif_read = [0, 0.0, 0.0]
    min_cpu = 0.3 if args.quick else 1.0
    for scene in scenes:
        pixels += scene_pixels(scene)
        jp2_bytes += sum(path.stat().st_size for path in jp2_files(scene))
        for count_threads in sorted({1, threads}):
            with tempfile.TemporaryDirectory(dir=workdir, prefix="decoded-") as tmp:
                out = Path(tmp)
                runs = [run_decode(scene, out, count_threads) for _ in range(repeat)]
                m = min(runs, key=lambda run: run["wall"])  # the least disturbed run
                print(f"  {scene.date} at {count_threads} thread(s), best of {repeat}: wall {m['wall']:.2f} s, "
                      f"{m['cpu']:.2f} core-s (CPU/wall {m['cpu'] / m['wall']:.2f}, "
                      f"{m['preempted']} involuntary context switches), {m['pixels'] / m['wall'] / 1e6:.1f} Mpx/s; "
                      f"peak resident {m['peak'] / 2**20:.0f} MiB (before decoding {m['baseline'] / 2**20:.0f} MiB)",
                      flush=True)
                slot = totals.setdefault(count_threads, {"wall": 0.0, "cpu": 0.0, "peak": 0.0, "growth": 0.0})
                slot["wall"] += m["wall"]
                slot["cpu"] += m["cpu"]
                slot["peak"] = max(slot["peak"], *(run["peak"] for run in runs))
                slot["growth"] = max(slot["growth"], *(run["peak"] - run["baseline"] for run in runs))
                if count_threads == threads:  # read the decoded rasters of the all-threads run
                    tifs = [out / band_file(band) for band in BANDS]
                    decoded_bytes += sum(path.stat().st_size for path in tifs)
                    for i, value in enumerate(read_timed(tifs, min_cpu)):
                        tif_read[i] += value
        for i, value in enumerate(read_timed(jp2_files(scene), min_cpu)):
            jp2_read[i] += value

    print("decode, per scene:")
    for count_threads, slot in sorted(totals.items()):
        wall, cpu = slot["wall"] / count, slot["cpu"] / count
        print(f"  {count_threads:>2} thread(s): wall {wall:.2f} s, {cpu:.2f} core-s, "
              f"{pixels / count / wall / 1e6:.1f} Mpx/s ({pixels / count / cpu / 1e6:.1f} Mpx/s per core-s)")
    efficiency = totals[1]["wall"] / (threads * totals[threads]["wall"])
    print(f"  parallel efficiency at {threads} threads: {efficiency:.3f} (goal >= 0.8 on 2 cores); core-seconds "
          f"at {threads} threads / at 1: {totals[threads]['cpu'] / totals[1]['cpu']:.2f} (wall times are only "
          f"meaningful on an otherwise idle machine: see the load average and CPU/wall above)")

    print(f"bytes on disk per scene: decoded {decoded_bytes / count / 1e6:.1f} MB, JPEG 2000 "
          f"{jp2_bytes / count / 1e6:.1f} MB (decoded / JPEG 2000 = {decoded_bytes / jp2_bytes:.2f})")

    jp2_speed, jp2_wall = jp2_read[0] / jp2_read[1], jp2_read[0] / jp2_read[2]
    tif_speed, tif_wall = tif_read[0] / tif_read[1], tif_read[0] / tif_read[2]
    print(f"read, one thread, windows of {READ_ROWS} rows, page cache dropped before every pass (goal: >= 25x):")
    print(f"  wall-clock: JPEG 2000 {jp2_wall / 1e6:.1f} Mpx/s, decoded GeoTIFF {tif_wall / 1e6:.1f} Mpx/s: "
          f"{tif_wall / jp2_wall:.1f}x")
    print(f"  CPU seconds: JPEG 2000 {jp2_speed / 1e6:.1f} Mpx/s per core, decoded GeoTIFF {tif_speed / 1e6:.1f} "
          f"Mpx/s per core: {tif_speed / jp2_speed:.1f}x")
    print(f"  CPU / wall while reading: JPEG 2000 {jp2_read[1] / jp2_read[2]:.2f}, decoded GeoTIFF "
          f"{tif_read[1] / tif_read[2]:.2f} (below 1: waiting for the disk or for a core)")

    # Memory: about two strips per thread (a strip: one JPEG 2000 tile row of a band, 2 bytes per pixel), plus
    # GDAL's block cache, which may hold the JPEG 2000 tiles read and the GeoTIFF tiles not yet flushed.
    growth = totals[threads]["growth"]
    base = totals[threads]["peak"] - growth
    strip = STRIP_ROWS * FULL_SIZE * 2
    bound = base + 2 * FULL_THREADS * strip
    raw = sum((FULL_SIZE * 10 // BAND_RESOLUTION[band]) ** 2 * 2 for band in BANDS)  # the scene, uint16
    cachemax = BLOCK_CACHE_BYTES  # the decode stage caps GDAL's block cache (pipeline/stages/decode.py)
    strips_here = 2 * threads * min(STRIP_ROWS, size) * size * 2

    def verdict(value: float) -> str:
        return f"{value / 1e9:.2f} GB ({'within' if value <= MEMORY_GOAL else 'OVER'} {MEMORY_GOAL / 1e9:.0f} GB)"

    print(f"memory (peak resident, VmHWM): {totals[threads]['peak'] / 2**20:.0f} MiB decoding at {threads} thread(s) "
          f"({totals[1]['peak'] / 2**20:.0f} MiB at 1), {growth / 2**20:.0f} MiB above the {base / 2**20:.0f} MiB "
          f"before decoding (2 strips per thread at this size: {strips_here / 2**20:.0f} MiB; "
          f"the decoded scene uncompressed: {pixels / count * 2 / 2**20:.0f} MiB)")
    print(f"  a {FULL_SIZE} px scene at {FULL_THREADS} threads, 2 strips per thread of {STRIP_ROWS} rows x {FULL_SIZE} "
          f"px x 2 bytes ({strip / 1e6:.1f} MB) + {base / 1e9:.2f} GB: {verdict(bound)}")
    print(f"  + GDAL's block cache, which the decode stage caps at {cachemax / 2**20:.0f} MiB: "
          f"{verdict(bound + min(cachemax, 2 * raw))}")
    print(f"decode_read_speedup {tif_wall / jp2_wall:.3f} (wall-clock, cold cache; CPU seconds "
          f"{tif_speed / jp2_speed:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
